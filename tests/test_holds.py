"""Holds: their owner and age (``prepaid holds``), the admin's release, and the listener's
reaper giving back the holds of calls gone from its server, against a real Redis."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from ami_listener.meter import Meter
from prepaid import callrecord
from prepaid.callrecord import CallRecord, hold_id, record_key
from prepaid.ledger import Ledger
from prepaid.rating import Rate
from tests.conftest import Run, cli

EUR = 1_000_000
RATE = Rate(prefix="44", name="United Kingdom", per_minute=12_000, connect_fee=0, initial=30,
            increment=6)



@pytest.fixture
async def funded(ledger: Ledger) -> Ledger:
    await ledger.create_account("1001", currency="EUR")
    await ledger.credit("1001", 10 * EUR, key="seed")
    return ledger


async def hold(ledger: Ledger, ref: str, amount: int, *, state: str | None = "authorized",
               authorized: float | None = None, account: str = "1001") -> None:
    """A call's hold, and its record in ``state`` (None: no record)."""
    await ledger.reserve(account, hold_id(ref), amount, key=f"auth:{ref}", ref="call")
    if state is None:
        return
    record = CallRecord(account=account, number="00441234", digits="441234", rate=RATE,
                        hold=amount, max_seconds=600, channel=f"PJSIP/{ref}",
                        uniqueid=ref, authorized=authorized or time.time())
    await callrecord.write(ledger.redis, "prepaid", record)
    if state != "authorized":
        await ledger.redis.hset(record_key("prepaid", ref), "state", state)


async def test_the_reaper_gives_back_only_this_servers_orphaned_holds(funded: Ledger) -> None:
    ledger = funded
    now = time.time()
    await hold(ledger, "pbx-a-1700000000.1", 1000, state=None)  # its record is gone
    await hold(ledger, "pbx-a-1700000000.2", 2000, state="released")  # release failed
    await hold(ledger, "pbx-a-1700000000.3", 3000)  # live, not yet seen by the tracker
    await hold(ledger, "pbx-a-1700000000.4", 4000, authorized=now - 5 * 3600)  # too old
    await hold(ledger, "pbx-a-1700000000.5", 5000, state="answered")  # metered now
    await hold(ledger, "pbx-b-1700000000.6", 6000, state=None)  # another server's
    await hold(ledger, "pbx-a-1700000000.7", 7000, state="ended")  # its settlement's
    meter = Meter(ledger, system_name="pbx-a", max_hold_seconds=4 * 3600)
    meter.tracker.calls["pbx-a-1700000000.5"] = None  # type: ignore[assignment]
    # A first pass only suspects: a hold's record may be being written this moment.
    assert await meter.reap(now=now) == 0
    assert len(await ledger.holds("1001")) == 7
    assert await meter.reap(now=now) == 3
    left = await ledger.holds("1001")
    assert sorted(left.values()) == [3000, 5000, 6000, 7000]
    acct = await ledger.get("1001")
    assert (acct.balance, acct.held) == (10 * EUR, 21_000)
    entries = await ledger.history("1001", 10)
    assert sum(1 for e in entries if e.ref.startswith("orphaned hold:")) == 3
    assert await meter.reap(now=now) == 0  # nothing more, nothing twice


@pytest.fixture
def run(redis_url: str, tmp_path: Path) -> Run:
    conf = tmp_path / "prepaid.toml"
    conf.write_text(f'[redis]\nurl = "{redis_url}"\n')
    return cli(conf)


async def test_prepaid_holds_lists_and_releases_once(funded: Ledger, run: Run) -> None:
    ledger = funded
    await hold(ledger, "pbx-a-1700000000.9", 160_000, authorized=time.time() - 90)
    await hold(ledger, "1700000000.10", 10_000, state=None)
    out = await asyncio.to_thread(run, "holds", "1001", "--json")
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert [(r["ref"], r["amount"], r["owner"], r["state"]) for r in rows] == [
        ("pbx-a-1700000000.9", "0.16", "pbx-a", "authorized"),
        ("1700000000.10", "0.01", "", "")]
    assert 89 <= rows[0]["age_seconds"] < 120 and rows[1]["age_seconds"] is None
    table = await asyncio.to_thread(run, "holds", "1001")
    assert "1m3" in table.output and "no record" in table.output
    done = await asyncio.to_thread(run, "holds", "release", "1001", "1700000000.10")
    assert done.exit_code == 0 and "released EUR 0.01" in done.output
    again = await asyncio.to_thread(run, "holds", "release", "1001", "1700000000.10")
    assert again.exit_code == 0 and "released before" in again.output
    assert list((await ledger.holds("1001")).values()) == [160_000]
    entries = await ledger.history("1001", 10)
    assert [e.ref for e in entries].count("released by the admin") == 1
    gone = await asyncio.to_thread(run, "holds", "release", "1001", "nothing.1")
    assert gone.exit_code == 1


@pytest.mark.parametrize("state", ["authorized", "answered"])
async def test_the_hold_of_a_live_call_is_released_only_with_force(
        funded: Ledger, run: Run, state: str) -> None:
    ledger = funded
    ref = "pbx-a-1700000000.11"
    await hold(ledger, ref, 160_000, state=state, authorized=time.time() - 90)
    before = await ledger.history("1001", 10)
    refused = await asyncio.to_thread(run, "holds", "release", "1001", ref)
    assert refused.exit_code == 1
    [line] = refused.output.splitlines()
    assert line.startswith(f"prepaid: error: hold call:{ref} of account '1001' belongs to a "
                           f"live call (state {state}, server pbx-a, authorized 9")
    assert line.endswith("its metering settles it when the call ends; --force releases it "
                         "anyway")
    assert await ledger.holds("1001") == {f"call:{ref}": 160_000}  # nothing changed
    assert await ledger.history("1001", 10) == before
    forced = await asyncio.to_thread(run, "holds", "release", "1001", ref, "--force", "--json")
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.output)["released"] == "0.16"
    assert await ledger.holds("1001") == {}
    assert [e.ref for e in await ledger.history("1001", 10)].count("released by the admin") == 1
    # A record of another account under the same reference is not this hold's call.
    other = "pbx-a-1700000000.12"
    await ledger.create_account("1002", currency="EUR")
    await ledger.credit("1002", EUR, key="seed2")
    await hold(ledger, other, 1000, account="1002")
    await ledger.reserve("1001", hold_id(other), 2000, key=f"auth2:{other}", ref="call")
    done = await asyncio.to_thread(run, "holds", "release", "1001", other)
    assert done.exit_code == 0, done.output
    assert await ledger.holds("1002") == {f"call:{other}": 1000}
