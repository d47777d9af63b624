"""Policy faults: SMTP down for minutes (3), a gateway that times out after charging (4)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from policy.commands import manual_topup
from policy.decide import retry_delay
from policy.gateway import ChargeResult, GatewayTimeout, SandboxGateway
from policy.mailer import MailQueue
from prepaid.store import Store, open_store
from testbed.servers import Mailbox, RedisServer
from tests.conftest import assert_verified
from tests.faults.conftest import cli_async, lines
from tests.test_policy_support import (
    EUR,
    GatedGateway,
    Smtp,
    body,
    mailer,
    make_settings,
    new_account,
    smtp,
    store,
    worker,
)

__all__ = ["smtp", "store"]  # fixtures


class FlakyMailbox(Mailbox):
    """Accepts ``accept`` messages, then answers 421 (service not available) to the rest."""

    def __init__(self, accept: int) -> None:
        super().__init__()
        self.accept = accept

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if len(self.messages) >= self.accept:
            return "421 4.3.0 mail system going down"
        return await super().handle_DATA(server, session, envelope)


def mail_ids(messages: list[Any]) -> list[str]:
    return [str(m["Message-ID"]).split("@")[0].lstrip("<") for m in messages]


async def test_smtp_down_for_minutes_delivers_every_mail_once_in_order(
        redis_url: str, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """Fault 3: five receipts queued; the server accepts two, answers 421 to the third and
    goes away; the mail worker retries ten times (with its back-off, 1+2+4+...+60 s, about
    five minutes); then the server is back: the other three arrive once each, in order."""
    caplog.set_level(logging.INFO, logger="policy")
    flaky = FlakyMailbox(accept=2)
    server = Smtp(flaky)
    server.start()
    st = await open_store(make_settings(redis_url, server.port))
    try:
        await new_account(st, action="none", token="")
        for n in range(1, 6):
            change = await manual_topup(st, "1001", EUR, f"inv-{n}")
            assert change.balance == (10 + n) * EUR  # credits never wait for SMTP
        m = mailer(st)
        assert await m.process_batch() == 2  # accepted two, then 421
        server.stop()  # and gone
        retries = 10
        for _ in range(retries):
            assert await m.process_batch() == 0
        waited = sum(retry_delay(n, cap=60.0) for n in range(1, retries + 2))
        assert waited >= 300  # what MailWorker.run would have slept between those tries
        queue = MailQueue(st.redis)
        states = [await queue.state(f"manual:1001:inv-{n}") for n in range(1, 6)]
        assert states == ["sent", "sent", "queued", "queued", "queued"]  # nothing lost
        server = Smtp(flaky)  # back, on the same port
        server.port = m.sender.smtp.port
        flaky.accept = 100
        server.start()
        assert await m.process_batch() == 3  # the first try after its return sends them all
        assert await m.process_batch() == 0
        assert mail_ids(flaky.messages) == [f"manual.1001.inv-{n}" for n in range(1, 6)]
        assert [body(msg).count("Reference:   inv-") for msg in flaky.messages] == [1] * 5
        # What the admin sees: the outage once (421 and refused connections alike), the
        # recovery once, and a line per mail sent.
        down = lines(caplog, "unavailable", logger="policy.mailer", level=logging.WARNING)
        assert len(down) == 1 and "SMTP server 127.0.0.1" in down[0]
        back = lines(caplog, "recovered after", logger="policy.mailer")
        assert back == [f"SMTP server 127.0.0.1:{server.port} recovered after "
                        f"{retries + 1} failure(s)"]
        assert len(lines(caplog, "mail manual:1001:inv-", logger="policy.mailer")) == 5
        shown = await cli_async(redis_url, tmp_path, "balance", "1001")
        assert shown.output.strip() == "1001: EUR 15.00"
        await assert_verified(st.ledger)
    finally:
        server.stop()
        await st.close()


class ChargeThenTimeout:
    """The provider charges the card, then the answer is lost: GatewayTimeout for the first
    ``times`` calls (each after a real sandbox charge), the real answer afterwards."""

    def __init__(self, inner: SandboxGateway, times: int = 1) -> None:
        self.inner = inner
        self.times = times
        self.keys: list[str] = []

    async def charge(self, account: str, token: str, amount_micros: int, currency: str,
                     idempotency_key: str) -> ChargeResult:
        self.keys.append(idempotency_key)
        result = await self.inner.charge(account, token, amount_micros, currency,
                                         idempotency_key)
        if len(self.keys) <= self.times:
            raise GatewayTimeout("payment provider did not answer within 10 s")
        return result


async def automatic_credits(st: Store) -> list[int]:
    return [e.amount for e in await st.ledger.history("1001", 1000)
            if e.kind == "credit" and e.ref.startswith("automatic")]


async def test_gateway_timing_out_after_charging_charges_once_and_credits_once(
        store: Store, smtp: Smtp, caplog: pytest.LogCaptureFixture, tmp_path: Path,
        redis_url: str) -> None:
    """Fault 4: the provider charged but its answer timed out.  The retry reuses the
    idempotency key, the provider answers with the first charge, the account is credited
    once; delayed: the credit, until the retry."""
    caplog.set_level(logging.INFO, logger="policy")
    await new_account(store)  # 10.00, threshold 5.00, top-up 20.00 from tok_ok
    sandbox = SandboxGateway(store.redis, store.ledger.prefix)
    gateway = ChargeThenTimeout(sandbox)
    w = worker(store, gateway=gateway, claim_idle_ms=0)
    change = await store.ledger.debit("1001", 5_500_000, key="call-1", ref="call")
    assert change.crossed
    assert await w.process_batch() == 0  # charged, answer lost: not acknowledged
    assert len(await sandbox.charges("1001")) == 1  # the card was charged...
    assert await automatic_credits(store) == []  # ...the credit waits for the retry
    assert await w.process_batch() == 1  # the retry
    assert await w.process_batch() == 0
    assert len(set(gateway.keys)) == 1 and len(gateway.keys) == 2
    [key] = set(gateway.keys)
    assert key.startswith("autotopup:1001:")
    charges = await sandbox.charges("1001")
    assert list(charges) == [key] and charges[key]["amount"] == 20 * EUR  # charged once
    assert await automatic_credits(store) == [20 * EUR]  # credited once
    assert (await store.ledger.get("1001")).balance == 4_500_000 + 20 * EUR
    assert await mailer(store).process_batch() == 1
    [receipt] = smtp.messages
    assert receipt["Subject"] == "Automatic top-up of EUR 20.00"
    assert f"Reference:   sb_{key}" in body(receipt)
    retry = lines(caplog, "will retry (attempt 1 of 5)", logger="policy.worker",
                  level=logging.WARNING)
    assert len(retry) == 1 and "did not answer within 10 s" in retry[0]
    history = await cli_async(redis_url, tmp_path, "history", "1001", "--json")
    entries = json.loads(history.output)
    assert [e["amount"] for e in entries if e["kind"] == "credit"] == ["20.00", "10.00"]
    await assert_verified(store.ledger)


async def test_gateway_timing_out_after_charging_every_time_is_given_up_charged_not_credited(
        store: Store, smtp: Smtp, caplog: pytest.LogCaptureFixture) -> None:
    """Fault 4, the limit: every attempt times out after the provider charged.  After
    [policy] gateway_max_attempts the top-up is given up: the card was charged once (the
    key never changed) and the account is NOT credited; the customer gets a notice with
    the reference and the admin an ERROR line naming it, to reconcile by hand."""
    caplog.set_level(logging.INFO, logger="policy")
    await new_account(store)
    sandbox = SandboxGateway(store.redis, store.ledger.prefix)
    gateway = ChargeThenTimeout(sandbox, times=100)
    w = worker(store, gateway=gateway, claim_idle_ms=0, max_attempts=3)
    await store.ledger.debit("1001", 5_500_000, key="call-1", ref="call")
    assert [await w.process_batch() for _ in range(4)] == [0, 0, 1, 0]
    assert len(gateway.keys) == 3 and len(set(gateway.keys)) == 1
    assert len(await sandbox.charges("1001")) == 1
    assert await automatic_credits(store) == []
    assert (await store.ledger.get("1001")).balance == 4_500_000
    [given_up] = lines(caplog, "given up", logger="policy.worker", level=logging.ERROR)
    assert "top-up autotopup:" in given_up and "for account 1001" in given_up
    assert f"idempotency key {gateway.keys[0]}" in given_up  # what the admin looks up
    assert await mailer(store).process_batch() == 1
    [notice] = smtp.messages
    text = body(notice)
    crossing = gateway.keys[0].rsplit(":", 1)[1]
    # The notice and the log line give the provider's key, to find the charge with it; the
    # notice promises no automatic credit (nothing reconciles it): support credits it.
    assert gateway.keys[0] == f"autotopup:1001:{crossing}"
    assert "could not be reached" in text and gateway.keys[0] in text
    assert "contact support" in " ".join(text.split())
    assert "automatically" not in text
    await assert_verified(store.ledger)


async def test_redis_dying_while_a_crossing_is_handled_is_retried_at_once_and_made_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """Redis (AOF, appendfsync always) is killed while the policy worker is in the middle of
    a top-up (lock taken, charge in flight).  Its unlock fails too; after the restart the
    worker's retry of the same event re-enters the lock it left (the lock names worker and
    event), so the top-up is not held up for [policy] topup_lock_seconds (2 s here): made
    once, at once."""
    caplog.set_level(logging.INFO, logger="policy")
    aof = RedisServer("--appendonly", "yes", "--appendfsync", "always")
    aof.start()
    sink = Smtp()
    sink.start()
    st = await open_store(make_settings(aof.url, sink.port))
    try:
        await new_account(st)
        sandbox = SandboxGateway(st.redis, st.ledger.prefix)
        gated = GatedGateway(sandbox)
        w = worker(st, gateway=gated, claim_idle_ms=100, lock_seconds=2)
        await st.ledger.debit("1001", 5_500_000, key="call-1")
        batch = asyncio.create_task(w.process_batch())
        await asyncio.wait_for(gated.entered.wait(), 5)
        assert aof.proc is not None
        aof.proc.kill()  # a crash while the charge is in flight
        aof.proc.wait(10)
        aof.proc = None
        gated.gate.set()
        assert await batch == 0
        aof.start()
        began = time.monotonic()
        while await w.process_batch() == 0:
            assert time.monotonic() - began < 5, "the top-up was not retried"
            await asyncio.sleep(0.05)  # the worker's own pace between batches
        delay = time.monotonic() - began
        assert delay < 1.0  # only the claim-idle time (0.1 s), not the lock's 2 s
        assert not lines(caplog, "already in flight", logger="policy.worker")
        [charge] = await sandbox.charges("1001")  # charged once
        assert charge.startswith("autotopup:1001:")
        assert await automatic_credits(st) == [20 * EUR]  # credited once
        assert len(lines(caplog, "Redis (policy outbox) unavailable", logger="policy.worker",
                         level=logging.ERROR)) == 1
        await assert_verified(st.ledger)
    finally:
        await st.close()
        sink.stop()
        aof.cleanup()

