"""Several Asterisk servers on one Redis: each listener meters only its own calls."""

from __future__ import annotations

from ami_listener.meter import Meter, on_server
from ami_listener.tracker import US
from prepaid.ledger import Ledger
from prepaid.rating import block_cost
from testbed.ami_peer import PER_SECOND, authorize, open_account


def test_a_call_belongs_to_the_server_named_in_its_uniqueid() -> None:
    assert on_server("pbx-a-1795315331.12", "pbx-a")
    assert not on_server("pbx-b-1795315331.12", "pbx-a")
    assert not on_server("1795315331.12", "pbx-a")
    assert on_server("1795315331.12", "")
    assert not on_server("pbx-a-1795315331.12", "")
    assert on_server("east-pbx-2-1795315331.12", "east-pbx-2")


async def test_restarting_one_listener_leaves_the_other_servers_calls_alone(
        ledger: Ledger) -> None:
    # One account calling through two servers at once: both calls share its credit.
    await open_account(ledger, 1_000_000)
    await authorize(ledger, "pbx-a-1795315331.1", "PJSIP/a-1", "00390612345678", PER_SECOND)
    await authorize(ledger, "pbx-b-1795315331.1", "PJSIP/b-1", "00390612345678", PER_SECOND)
    hold = block_cost(PER_SECOND, 1)
    assert (await ledger.get("alice")).held == 2 * hold

    # Listener A restarts; its Asterisk lists no channels: A's call ended while it was away.
    meter_a = Meter(ledger, system_name="pbx-a")
    assert await meter_a.recover() == 1
    await meter_a.handle({"Event": "CoreShowChannelsComplete", "EventList": "Complete",
                          "ListItems": "0"})
    # Its Cdr event may still come for 3 s; then (no CDR file) it is settled.
    await meter_a.tick(1795315340 * US)
    await meter_a.tick(1795315344 * US)
    holds = await ledger.holds("alice")
    assert holds == {"call:pbx-b-1795315331.1": hold}  # B's call still holds its credit
    assert await ledger.redis.hget("prepaid:callref:pbx-b-1795315331.1", "state") == (
        b"authorized")
    account = await ledger.get("alice")
    assert (account.balance, account.held) == (1_000_000, hold)  # never answered: free
