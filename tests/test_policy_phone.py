"""Phone top-ups (prepaid/selfservice.py, policy/phone.py) against real Redis and SMTP: the
menu's request, the worker's charge with the rails of automatic top-ups, the outcome key."""

from __future__ import annotations

import asyncio
from typing import Any

from policy.gateway import SandboxGateway
from policy.phone import PhoneTopups
from prepaid import selfservice
from prepaid.selfservice import TopupRequest, TopupResult
from prepaid.store import Store
from tests.test_policy_support import EUR, Smtp, body, mailer, new_account, smtp, store

__all__ = ["smtp", "store"]  # fixtures


def phone(st: Store, name: str = "p1", **kw: Any) -> PhoneTopups:
    return PhoneTopups(st.redis, st.ledger, st.settings, SandboxGateway(st.redis, st.ledger.prefix),
                       consumer=name, retry_idle_ms=0, **kw)


def request(amount: int = 10 * EUR, key: str = "1700000000.1:a1", *, account: str = "1001",
            within: float = 5.0) -> TopupRequest:
    return TopupRequest(account, amount, key, within)


async def charges(st: Store, account: str = "1001") -> dict[str, dict[str, object]]:
    return await SandboxGateway(st.redis, st.ledger.prefix).charges(account)


async def test_a_phone_top_up_is_charged_once_credited_and_receipted(store: Store,
                                                                     smtp: Smtp) -> None:
    await new_account(store, action="email")
    req = request()
    await selfservice.submit(store.ledger, req)
    await selfservice.submit(store.ledger, req)  # the same request twice: charged once
    w = phone(store)
    assert await w.process_batch() == 2
    got = await selfservice.read(store.ledger, req)
    assert got == TopupResult("credited", 20 * EUR)
    assert (await store.ledger.get("1001")).balance == 20 * EUR
    [(key, charge)] = (await charges(store)).items()
    assert key == "ivrtopup:1001:1700000000.1:a1" and charge["amount"] == 10 * EUR
    [credit] = [e for e in await store.ledger.history("1001") if e.ref.startswith("phone")]
    assert credit.amount == 10 * EUR and credit.ref == "phone top-up sb_" + key
    assert await mailer(store).process_batch() == 1
    [msg] = smtp.messages
    assert msg["Subject"] == "Top-up of EUR 10.00 by phone"
    assert "Card:        visa ending 4242" in body(msg)
    assert "New balance: EUR 20.00" in body(msg)


async def test_a_declined_card_backs_off_and_sends_a_notice(store: Store, smtp: Smtp) -> None:
    await new_account(store, token="tok_decline")
    req = request()
    await selfservice.submit(store.ledger, req)
    assert await phone(store).process_batch() == 1
    got = await selfservice.read(store.ledger, req)
    assert got is not None and got.state == "declined" and got.balance == 10 * EUR
    acct = await store.ledger.get("1001")
    assert acct.balance == 10 * EUR
    raw = await store.redis.hget(store.ledger.account_key("1001"), "declines")
    assert raw == b"1"
    # The back-off refuses the next phone top-up, and nothing is charged for it.
    again = request(key="1700000000.1:a2")
    await selfservice.submit(store.ledger, again)
    assert await phone(store).process_batch() == 1
    refused = await selfservice.read(store.ledger, again)
    assert refused is not None and refused.state == "refused"
    assert "declined recently" in refused.reason
    assert list(await charges(store)) == ["ivrtopup:1001:1700000000.1:a1"]
    assert await mailer(store).process_batch() == 1
    [msg] = smtp.messages
    assert msg["Subject"] == "Top-up by phone failed for account 1001"
    assert "the card was declined" in body(msg)


async def test_an_amount_not_offered_and_the_daily_cap_are_refused(store: Store,
                                                                   smtp: Smtp) -> None:
    await new_account(store)
    odd = request(7 * EUR, "k:odd")
    await selfservice.submit(store.ledger, odd)
    for n in range(6):  # the test settings allow 5 top-ups a day
        await selfservice.submit(store.ledger, request(5 * EUR, f"k:{n}"))
    assert await phone(store).process_batch() == 7
    results = [await selfservice.read(store.ledger, request(key=f"k:{n}")) for n in range(6)]
    assert [r.state for r in results if r] == ["credited"] * 5 + ["refused"]
    assert "daily limit of 5" in (results[5].reason if results[5] else "")
    odd_result = await selfservice.read(store.ledger, odd)
    assert odd_result is not None and odd_result.state == "refused"
    assert len(await charges(store)) == 5
    assert (await store.ledger.get("1001")).balance == 35 * EUR


async def test_a_request_the_menu_gave_up_on_is_never_charged(store: Store,
                                                              smtp: Smtp) -> None:
    await new_account(store)
    req = request(within=0.2)
    await selfservice.submit(store.ledger, req)
    # No worker runs: the menu's wait ends at the request's expiry and claims it first.
    assert await selfservice.wait(store.ledger, req, poll=0.02) == TopupResult("abandoned")
    assert await phone(store).process_batch() == 1
    assert await charges(store) == {}
    assert (await store.ledger.get("1001")).balance == 10 * EUR


async def test_an_expired_request_is_not_started_even_unclaimed(store: Store,
                                                                smtp: Smtp) -> None:
    await new_account(store)
    # Written 10 s ago by Redis's clock for a 5 s wait: its menu died without claiming it.
    seconds, _ = await store.redis.time()
    req = request(within=5.0)
    fields: dict[Any, Any] = req.fields()
    await store.redis.xadd(selfservice.requests_key(store.ledger.prefix), fields,
                           id=f"{(seconds - 10) * 1000}-0")
    assert await phone(store).process_batch() == 1
    assert await selfservice.read(store.ledger, req) == TopupResult("abandoned")
    assert await charges(store) == {}


async def test_the_menu_waits_for_the_running_worker(store: Store, smtp: Smtp) -> None:
    await new_account(store)
    w = phone(store)
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop, block_ms=50))
    try:
        req = request()
        await selfservice.submit(store.ledger, req)
        got = await selfservice.wait(store.ledger, req, poll=0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert got == TopupResult("credited", 20 * EUR)


async def test_a_request_still_charging_at_the_deadline_is_pending(store: Store,
                                                                   smtp: Smtp) -> None:
    await new_account(store)
    req = request(within=0.2)
    await selfservice.submit(store.ledger, req)
    assert await selfservice.claim(store.ledger, req, "charging") is None  # a worker started
    assert await selfservice.wait(store.ledger, req, poll=0.02) == TopupResult("pending")
    # The worker goes on (same keys) and the outcome is still written once.
    assert await phone(store).process_batch() == 1
    got = await selfservice.read(store.ledger, req)
    assert got is not None and got.state == "credited"
    assert len(await charges(store)) == 1


async def test_a_top_up_in_flight_for_the_account_makes_the_request_wait(store: Store,
                                                                         smtp: Smtp) -> None:
    await new_account(store)
    w = phone(store)
    lock = w.lock_key("1001")
    await store.redis.set(lock, "other-worker:crossing", ex=60)  # an automatic top-up
    req = request()
    await selfservice.submit(store.ledger, req)
    assert await w.process_batch() == 0  # not started: nothing claimed, nothing charged
    assert await selfservice.read(store.ledger, req) is None
    assert await charges(store) == {}
    await store.redis.delete(lock)
    assert await w.process_batch() == 1
    assert await selfservice.read(store.ledger, req) == TopupResult("credited", 20 * EUR)


async def test_a_malformed_request_is_dropped_with_one_line(store: Store, smtp: Smtp,
                                                            caplog: Any) -> None:
    await new_account(store)
    stream = selfservice.requests_key(store.ledger.prefix)
    await store.redis.xadd(stream, {"kind": "ivr-topup", "account": "1001", "amount": "-5",
                                    "key": "k", "wait": "5"})
    await store.redis.xadd(stream, {"kind": "refund", "account": "1001"})
    await selfservice.submit(store.ledger, request())
    assert await phone(store).process_batch() == 3
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and all("dropping it" in e for e in errors), errors
    assert "amount -5 is not positive" in errors[0] and "unknown kind 'refund'" in errors[1]
    assert (await store.ledger.get("1001")).balance == 20 * EUR
