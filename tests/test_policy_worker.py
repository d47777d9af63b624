"""The policy worker against real Redis and a real SMTP server: crossings, top-ups, races."""

from __future__ import annotations

import asyncio
import logging

import pytest

from policy.gateway import SandboxGateway
from policy.worker import GROUP
from prepaid.store import Store
from tests.test_policy_support import (
    EUR,
    Crash,
    CrashAfterCharge,
    GatedGateway,
    Smtp,
    body,
    mailer,
    new_account,
    smtp,
    store,
    wait_until,
    worker,
)

__all__ = ["smtp", "store"]  # fixtures


async def pending(st: Store) -> int:
    info = await st.redis.xpending(st.ledger.outbox_key, GROUP)
    return int(info["pending"])


async def credits(st: Store, account: str) -> list[int]:
    return [e.amount for e in await st.ledger.history(account, 1000) if e.kind == "credit"]


async def test_one_email_per_crossing_with_20_concurrent_debits(store: Store,
                                                                smtp: Smtp) -> None:
    await new_account(store, action="email", token="")
    await asyncio.gather(*(store.ledger.debit("1001", 300_000, key=f"d{i}", ref="call")
                           for i in range(20)))
    assert (await store.ledger.get("1001")).balance == 4 * EUR
    assert await store.redis.xlen(store.ledger.outbox_key) == 1
    w = worker(store)
    assert await w.process_batch() == 1
    assert await w.process_batch() == 0
    m = mailer(store)
    assert await m.process_batch() == 1
    assert await m.process_batch() == 0
    [msg] = smtp.messages
    assert msg["To"] == "ann@example.org" and msg["From"] == "billing@pbx.test"
    assert msg["Subject"] == "Your prepaid balance is low: EUR 4.00"
    assert "below the\nthreshold of EUR 5.00" in body(msg)
    assert "<b>EUR 4.00</b>" in body(msg, "html")
    assert await pending(store) == 0


async def test_rearms_after_a_top_up(store: Store, smtp: Smtp) -> None:
    from policy.commands import manual_topup

    await new_account(store, action="email", token="")
    w, m = worker(store), mailer(store)
    await store.ledger.debit("1001", 6 * EUR, key="d1")  # 10 -> 4: crosses
    await store.ledger.debit("1001", 1 * EUR, key="d2")  # 4 -> 3: still below, no event
    assert await w.process_batch() == 1
    change = await manual_topup(store, "1001", 3 * EUR, "rcpt-1")  # 3 -> 6: re-armed
    assert change.balance == 6 * EUR
    await store.ledger.debit("1001", 2 * EUR, key="d3")  # 6 -> 4: crosses again
    assert await w.process_batch() == 1
    assert await m.process_batch() == 3
    subjects = sorted(str(x["Subject"]) for x in smtp.messages)
    assert subjects == ["Top-up of EUR 3.00 received", "Your prepaid balance is low: EUR 3.00",
                        "Your prepaid balance is low: EUR 4.00"]


async def test_automatic_top_up_credits_and_sends_a_receipt(store: Store, smtp: Smtp) -> None:
    await new_account(store)
    change = await store.ledger.debit("1001", 5_500_001, key="call-1")
    assert change.crossed
    w = worker(store)
    assert await w.process_batch() == 1
    acct = await store.ledger.get("1001")
    assert acct.balance == 10 * EUR - 5_500_001 + 20 * EUR == 24_499_999
    [entry] = [e for e in await store.ledger.history("1001") if e.kind == "credit"
               and e.ref.startswith("automatic")]
    assert entry.amount == 20 * EUR
    assert await mailer(store).process_batch() == 1
    [msg] = smtp.messages
    assert msg["Subject"] == "Automatic top-up of EUR 20.00"
    text = body(msg)
    for line in ("Amount:      EUR 20.00", "New balance: EUR 24.499999",
                 "Card:        visa ending 4242", "Reference:   sb_autotopup:"):
        assert line in text
    assert "visa ending 4242" in body(msg, "html")


async def test_accounts_sharing_a_crossing_id_are_each_topped_up(store: Store,
                                                                 smtp: Smtp) -> None:
    # A crossing id is an entry id of the account's own history: two accounts debited in the
    # same millisecond share it.  Their charges and e-mails must not be taken for one another.
    for acct in ("a1", "a2"):
        await new_account(store, acct, balance=4 * EUR)  # below 5 already: no event yet
        await store.redis.xadd(store.ledger.outbox_key, {
            "account": acct, "crossing": "1700000000000-0", "action": "topup",
            "balance": str(4 * EUR), "threshold": str(5 * EUR), "topup_amount": str(20 * EUR)})
    assert await worker(store).process_batch() == 2
    sandbox = SandboxGateway(store.redis, store.ledger.prefix)
    for acct in ("a1", "a2"):
        assert (await store.ledger.get(acct)).balance == 24 * EUR
        assert list(await sandbox.charges(acct)) == [f"autotopup:{acct}:1700000000000-0"]
    assert await mailer(store).process_batch() == 2
    assert sorted(str(m["To"]) for m in smtp.messages) == ["ann@example.org"] * 2


async def test_two_workers_racing_credit_exactly_once(store: Store, smtp: Smtp) -> None:
    await new_account(store)
    gated = GatedGateway(SandboxGateway(store.redis, store.ledger.prefix))
    a = worker(store, "a", gateway=gated)
    b = worker(store, "b", claim_idle_ms=0)  # takes over anything pending at once
    await store.ledger.debit("1001", 6 * EUR, key="call-1")
    first = asyncio.create_task(a.process_batch())
    await asyncio.wait_for(gated.entered.wait(), 5)  # a is charging right now
    assert await b.process_batch() == 0  # b claimed the event but a holds the account lock
    gated.gate.set()
    assert await first == 1
    assert await b.process_batch() == 0
    assert await credits(store, "1001") == [20 * EUR, 10 * EUR]
    charges = await SandboxGateway(store.redis, store.ledger.prefix).charges("1001")
    assert len(charges) == 1
    assert await pending(store) == 0


async def test_a_worker_dying_after_the_charge_is_finished_by_another(store: Store,
                                                                      smtp: Smtp) -> None:
    await new_account(store)
    sandbox = SandboxGateway(store.redis, store.ledger.prefix)
    dying = worker(store, "dying", gateway=CrashAfterCharge(sandbox))
    await store.ledger.debit("1001", 6 * EUR, key="call-1")
    with pytest.raises(Crash):
        await dying.process_batch()
    assert len(await sandbox.charges("1001")) == 1  # charged, but not credited nor acked
    assert (await store.ledger.get("1001")).balance == 4 * EUR
    assert await pending(store) == 1
    rescuer = worker(store, "rescuer", claim_idle_ms=0)
    assert await rescuer.process_batch() == 1
    assert (await store.ledger.get("1001")).balance == 24 * EUR
    assert len(await sandbox.charges("1001")) == 1  # same idempotency key: not charged again
    assert await rescuer.process_batch() == 0
    assert await pending(store) == 0
    assert await mailer(store).process_batch() == 1
    assert [str(m["Subject"]) for m in smtp.messages] == ["Automatic top-up of EUR 20.00"]


async def test_a_worker_dying_after_the_credit_does_not_credit_again(store: Store,
                                                                     smtp: Smtp) -> None:
    await new_account(store)
    dying = worker(store, "dying")
    original = dying.redis.xack

    async def crash(*args: object) -> int:
        raise Crash()

    dying.redis.xack = crash  # type: ignore[method-assign,assignment]
    await store.ledger.debit("1001", 6 * EUR, key="call-1")
    with pytest.raises(Crash):
        await dying.process_batch()
    dying.redis.xack = original  # type: ignore[method-assign]
    assert (await store.ledger.get("1001")).balance == 24 * EUR
    assert await worker(store, "rescuer", claim_idle_ms=0).process_batch() == 1
    assert (await store.ledger.get("1001")).balance == 24 * EUR
    assert await credits(store, "1001") == [20 * EUR, 10 * EUR]
    assert await mailer(store).process_batch() == 1
    assert len(smtp.messages) == 1


async def cross_again(st: Store, n: int) -> None:
    """Bring the balance back to 10 (re-arm) and then below the threshold of 5."""
    acct = await st.ledger.get("1001")
    if acct.balance < 10 * EUR:
        await st.ledger.credit("1001", 10 * EUR - acct.balance, key=f"re{n}")
    elif acct.balance > 10 * EUR:
        await st.ledger.debit("1001", acct.balance - 10 * EUR, key=f"down{n}")
    change = await st.ledger.debit("1001", 6 * EUR, key=f"cross{n}")
    assert change.crossed


async def test_declines_back_off_then_switch_to_email(store: Store, smtp: Smtp) -> None:
    await new_account(store, token="tok_decline")
    clock = [1_800_000_000.0]
    w, m = worker(store, now=lambda: clock[0]), mailer(store)
    await cross_again(store, 1)
    assert await w.process_batch() == 1  # decline 1
    raw = await store.redis.hmget(store.ledger.account_key("1001"), ["declines",
                                                                     "decline_until"])
    assert raw == [b"1", b"1800000600"]
    clock[0] += 60
    await cross_again(store, 2)
    assert await w.process_batch() == 1  # inside the back-off: refused without charging
    clock[0] += 600
    await cross_again(store, 3)
    assert await w.process_batch() == 1  # decline 2
    clock[0] += 601
    await cross_again(store, 4)
    assert await w.process_batch() == 1  # decline 3: gives up on automatic top-ups
    acct = await store.ledger.get("1001")
    assert acct.action == "email" and acct.balance == 4 * EUR
    await cross_again(store, 5)
    assert await w.process_batch() == 1  # now only a warning
    assert await m.process_batch() == 5
    sandbox = SandboxGateway(store.redis, store.ledger.prefix)
    assert len(await sandbox.charges("1001")) == 3
    subjects = [str(x["Subject"]) for x in smtp.messages]
    assert subjects == ["Automatic top-up failed for account 1001"] * 4 + [
        "Your prepaid balance is low: EUR 4.00"]
    texts = [body(x) for x in smtp.messages]
    assert "Reason: the card was declined" in texts[0]
    assert "What to do: please check your card or store a new one" in texts[0]
    assert "switched off" not in texts[0]
    assert "declined recently; the next automatic attempt is allowed after" in texts[1]
    assert "automatic top-ups are switched off" in texts[3].replace("\n", " ")
    assert "automatic top-ups are switched off" in body(smtp.messages[3], "html")


async def test_a_success_resets_the_decline_count(store: Store, smtp: Smtp) -> None:
    await new_account(store, token="tok_decline")
    w = worker(store)
    await cross_again(store, 1)
    await w.process_batch()
    await store.ledger.update("1001", card_token="tok_ok", decline_until="0")
    await cross_again(store, 2)
    await w.process_batch()
    raw = await store.redis.hget(store.ledger.account_key("1001"), "declines")
    assert raw == b"0" and (await store.ledger.get("1001")).balance == 24 * EUR


async def test_authentication_required_asks_to_approve(store: Store, smtp: Smtp) -> None:
    await new_account(store, token="tok_auth_required")
    await cross_again(store, 1)
    assert await worker(store).process_batch() == 1
    assert await mailer(store).process_batch() == 1
    text = body(smtp.messages[0])
    assert "asks the card holder to authenticate" in text
    assert "please approve the payment with your bank" in text


async def test_daily_cap_on_the_number_of_top_ups(store: Store, smtp: Smtp) -> None:
    from prepaid.store import open_store
    from tests.test_policy_support import make_settings

    await new_account(store)

    st = await open_store(make_settings(store.settings.redis.url, smtp.port, daily_topups=2))
    try:
        w = worker(st)
        for n in range(3):
            await cross_again(st, n)
            assert await w.process_batch() == 1
        assert await credits(st, "1001") == [20 * EUR, 20 * EUR, 10 * EUR]
        assert (await st.ledger.get("1001")).balance == 4 * EUR
        assert await mailer(st).process_batch() == 3
        assert "Reason: the daily limit of 2 automatic top-ups is reached" in body(
            smtp.messages[2])
    finally:
        await st.close()


async def test_daily_cap_on_the_amount(store: Store, smtp: Smtp) -> None:
    from prepaid.store import open_store
    from tests.test_policy_support import make_settings

    await new_account(store)
    st = await open_store(make_settings(store.settings.redis.url, smtp.port,
                                        daily_topup_amount="30"))
    try:
        w = worker(st)
        await cross_again(st, 1)
        await w.process_batch()
        await cross_again(st, 2)
        await w.process_batch()
        assert await credits(st, "1001") == [20 * EUR, 10 * EUR]
        await mailer(st).process_batch()
        assert "limit of EUR 30.00 would be exceeded" in body(smtp.messages[1])
    finally:
        await st.close()


async def test_gateway_timeouts_are_retried_then_given_up(store: Store, smtp: Smtp) -> None:
    await new_account(store, token="tok_timeout")
    w = worker(store, claim_idle_ms=0, max_attempts=2)
    await cross_again(store, 1)
    assert await w.process_batch() == 0  # unknown outcome: left pending for a retry
    assert await pending(store) == 1
    assert await w.process_batch() == 1  # second attempt: given up for good
    assert await pending(store) == 0
    await mailer(store).process_batch()
    assert "payment provider could not be reached" in body(smtp.messages[0])
    assert (await store.ledger.get("1001")).balance == 4 * EUR


async def test_topup_without_a_card_sends_a_failure_notice(store: Store, smtp: Smtp) -> None:
    await new_account(store, token="")
    await cross_again(store, 1)
    assert await worker(store).process_batch() == 1
    await mailer(store).process_batch()
    text = body(smtp.messages[0])
    assert "Reason: no card is stored for automatic top-ups" in text
    assert "store a card for automatic top-ups" in text


async def test_a_malformed_event_is_dropped_with_one_clear_log_line(
        store: Store, smtp: Smtp, caplog: pytest.LogCaptureFixture) -> None:
    await store.redis.xadd(store.ledger.outbox_key, {"account": "1001", "crossing": "1-0"})
    with caplog.at_level(logging.ERROR):
        assert await worker(store).process_batch() == 1
    assert "field 'action' is missing; dropping it" in caplog.text


async def test_running_worker_tops_up_mid_call_at_once(store: Store, smtp: Smtp) -> None:
    from policy.worker import run

    await new_account(store)
    stop = asyncio.Event()
    task = asyncio.create_task(run(store, stop))
    try:
        await store.ledger.reserve("1001", "call:abc", 1 * EUR, key="auth:abc")
        await store.ledger.settle("1001", "call:abc", 1 * EUR, key="blk:abc:1")
        await store.ledger.debit("1001", 5 * EUR, key="blk:abc:2")  # 9 -> 4: crosses

        async def credited() -> bool:
            return (await store.ledger.get("1001")).balance == 24 * EUR

        async def mailed() -> bool:
            return len(smtp.messages) == 1

        await wait_until(credited, limit=3)
        await wait_until(mailed, limit=3)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert task.done() and task.exception() is None
