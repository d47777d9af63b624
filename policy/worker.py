"""The policy worker: acts on threshold crossings from the ledger's outbox stream.

At least once, never twice: events are read with the consumer group ``policy``
(XREADGROUP), a dead worker's pending events are claimed by another (XAUTOCLAIM after
``claim_idle_ms``), and an event is acknowledged only after its action completed or was
given up for good.  Doing an action again is harmless: the ledger credit has the
idempotency key ``autotopup:<crossing>`` (the ledger's keys are per account) and the
gateway charge ``autotopup:<account>:<crossing>`` (the provider's keys are global and two
accounts' history ids can be equal), a decline is counted once per event, and each e-mail
has its own id ``<kind>:<account>:<crossing>`` in the mail queue.

The ledger writes a crossing to the account's own outbox ``P:{acct:ID}:outbox`` (one
cluster slot with the account) and forwards it at once to ``P:outbox``; every
``sweep_seconds`` the worker forwards what a process that died in between left behind
(a crossing forwarded twice is acted on once, by the keys above).

Redis keys (``P`` = key prefix, all per-account keys in the account's hash tag):
``P:outbox`` (stream, group ``policy``), ``P:{acct:ID}:topup-lock`` (one top-up in flight),
``P:{acct:ID}:topup:<crossing>`` (hash: amount, state, attempts, declined, switched),
``P:{acct:ID}:topups:<YYYYMMDD>`` (hash crossing -> amount: today's top-ups for the caps).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections.abc import Callable

from policy.decide import (
    Decision,
    Event,
    State,
    after_decline,
    day_of,
    decide,
    parse_event,
    retry_delay,
    stamp,
)
from policy.gateway import ChargeResult, Gateway, PaymentError
from policy.mailer import MailQueue, MailWorker, Templates, compose
from policy.payments import make_gateway
from prepaid import lua, metrics
from prepaid.config import Settings
from prepaid.deadletters import DeadLetters
from prepaid.errors import InputError, StoreUnavailable, UnknownAccount
from prepaid.ledger import Account, Ledger
from prepaid.money import format_amount
from prepaid.outage import OutageLog
from prepaid.redis_client import REDIS_ERRORS, RedisClient, text
from prepaid.store import Store
from prepaid.streams import ConsumerGroup

log = logging.getLogger(__name__)

GROUP = "policy"
OUTAGES: tuple[type[Exception], ...] = (*REDIS_ERRORS, StoreUnavailable)
RECORD_TTL = 7 * 86400
DAY_TTL = 3 * 86400


def mail_context(acct: Account, **extra: str) -> dict[str, str]:
    """The placeholders every template may use, money formatted in the account currency."""
    ctx = {"account": acct.id, "currency": acct.currency,
           "balance": format_amount(acct.balance, acct.currency),
           "threshold": format_amount(acct.threshold, acct.currency),
           "amount": format_amount(acct.topup_amount, acct.currency),
           "card": f"{acct.card_brand} ending {acct.card_last4}" if acct.has_card else "none",
           "reference": "", "reason": "", "advice": "", "switched": "",
           "time": stamp(time.time())}
    ctx.update(extra)
    return ctx


class PolicyWorker:
    def __init__(self, client: RedisClient, ledger: Ledger, settings: Settings,
                 gateway: Gateway, *, consumer: str | None = None,
                 claim_idle_ms: int = 60_000, lock_seconds: int = 120, max_attempts: int = 5,
                 batch: int = 20, now: Callable[[], float] = time.time,
                 sweep_seconds: float = 30.0, sweep_min_age: float = 5.0,
                 dead_letter_after: int = 5) -> None:
        self.redis = client
        self.ledger = ledger
        self.settings = settings
        self.caps = settings.policy
        self.gateway = gateway
        self.prefix = ledger.prefix
        self.mail = MailQueue(client, self.prefix)
        self.templates = Templates(settings.smtp.templates)
        self.consumer = consumer or f"{socket.gethostname()}-{secrets.token_hex(3)}"
        self.claim_idle_ms = claim_idle_ms
        self.lock_seconds = lock_seconds
        self.max_attempts = max_attempts
        self.batch = batch
        self.now = now
        self.redis_outage = OutageLog(log, "Redis (policy outbox)")
        self._unlock = client.register_script(lua.TOPUP_UNLOCK)
        self._lock = client.register_script(lua.TOPUP_LOCK)
        self.dead_letters = DeadLetters(client, self.prefix)
        self.dead_letter_after = dead_letter_after
        # Its own failures again only after claim_idle_ms: a top-up waiting for the lock or
        # for a gateway retry must not spin (prepaid/streams.py).
        self.group = ConsumerGroup(client, ledger.outbox_key, GROUP, self.consumer,
                                   claim_idle_ms=claim_idle_ms, retry_idle_ms=claim_idle_ms,
                                   batch=batch, dead_letters=self.dead_letters,
                                   dead_letter_after=dead_letter_after)
        self.sweep_seconds = sweep_seconds
        self.sweep_min_age = sweep_min_age  # younger crossings are left to their writer
        self._next_sweep = 0.0  # monotonic time; 0: sweep on the first batch

    # -- keys ----------------------------------------------------------------
    def _acct(self, account: str) -> str:
        return self.ledger.account_key(account)

    def lock_key(self, account: str) -> str:
        return f"{self._acct(account)}:topup-lock"

    def record_key(self, ev: Event) -> str:
        return f"{self._acct(ev.account)}:topup:{ev.crossing}"

    def day_key(self, account: str, now: float) -> str:
        return f"{self._acct(account)}:topups:{day_of(now)}"

    # -- reading the outbox ------------------------------------------------------
    async def ensure_group(self) -> None:
        await self.group.ensure()

    async def fetch(self, block_ms: int | None = None) -> list[tuple[str, dict[str, str]]]:
        """Its own events left to retry, then those idle in a dead worker's hands, then new
        ones (prepaid/streams.py)."""
        rows = await self.group.fetch(block_ms)
        return [(i, {text(k): text(v) for k, v in f.items()}) for i, f in rows]

    async def process_batch(self, block_ms: int | None = None) -> int:
        """Handle what is waiting; return how many events were acknowledged.

        Redis outages are logged once and leave the events for a later batch. An event
        whose handling raises (a bad record, a bug) is left to retry, the others go on;
        after ``dead_letter_after`` failures it is parked (prepaid/deadletters.py).
        """
        try:
            rows = await self.group.fetch(block_ms)
            acked = 0
            for entry_id, raw in rows:
                try:
                    done = await self.handle(entry_id, {text(k): text(v)
                                                        for k, v in raw.items()})
                except OUTAGES:
                    raise
                except Exception as exc:  # this event only; never the worker
                    acked += await self.group.failed(entry_id, raw, exc)
                    continue
                if done:
                    await self.group.ack(entry_id)
                    acked += 1
        except OUTAGES as exc:
            self.redis_outage.failure(exc)
            return 0
        self.redis_outage.success()
        return acked

    async def sweep(self) -> int:
        """Forward crossings left in accounts' own outboxes by a process that died between
        the ledger change and the forward; returns how many."""
        moved = await self.ledger.sweep_outboxes(self.sweep_min_age)
        if moved:
            log.warning("forwarded %s threshold crossing(s) left behind in account outboxes",
                        moved)
        return moved

    async def _sweep_if_due(self) -> None:
        if time.monotonic() < self._next_sweep:
            return
        try:
            await self.sweep()
        except OUTAGES as exc:
            self.redis_outage.failure(exc)
            return
        self._next_sweep = time.monotonic() + self.sweep_seconds

    async def run(self, stop: asyncio.Event, block_ms: int = 500) -> None:
        while not stop.is_set():
            await self._sweep_if_due()
            await self.process_batch(block_ms)
            if self.redis_outage.failures:
                try:
                    await asyncio.wait_for(stop.wait(),
                                           retry_delay(self.redis_outage.failures, cap=30.0))
                except TimeoutError:
                    pass

    # -- one event -------------------------------------------------------------
    async def handle(self, entry_id: str, fields: dict[str, str]) -> bool:
        """Act on one outbox entry; True when it may be acknowledged."""
        try:
            ev = parse_event(entry_id, fields)
        except InputError as exc:
            log.error("%s; dropping it", exc)
            return True
        # The token names this worker and the event: only this worker's own retry of the
        # event re-enters (its earlier attempt has ended: a worker handles one event at a
        # time); another worker that claims the event still waits for the lock.
        token = f"{self.consumer}:{ev.crossing}"
        lock = self.lock_key(ev.account)
        if not await self._lock(keys=[lock], args=[token, self.lock_seconds]):
            log.info("top-up for account %s already in flight; event %s waits", ev.account,
                     entry_id)
            return False
        try:
            return await self._handle_locked(ev)
        finally:
            await self._unlock(keys=[lock], args=[token])

    async def _handle_locked(self, ev: Event) -> bool:
        try:
            acct = await self.ledger.get(ev.account)
        except UnknownAccount:
            log.error("outbox event %s names unknown account %s; dropping it", ev.id, ev.account)
            return True
        now = self.now()
        state = await self._state(acct, ev, now)
        decision = decide(state, self.caps, now)
        log.info("account %s crossing %s: %s %s", ev.account, ev.crossing, decision.kind,
                 decision.reason)
        if decision.kind == "ignore":
            return True
        if decision.kind == "warn":
            await self._mail(acct, "low_balance", mail_id("low", ev), mail_context(acct))
            return True
        if decision.kind == "refuse":
            await self._mail(acct, "topup_failed", mail_id("fail", ev), mail_context(
                acct, reason=decision.reason, reference=f"autotopup:{ev.crossing}",
                advice=_advice(decision.reason)))
            return True
        return await self._topup(acct, ev, decision, now)

    async def _state(self, acct: Account, ev: Event, now: float) -> State:
        raw = await self.redis.hmget(self._acct(acct.id), ["declines", "decline_until"])
        record = await self.redis.hget(self.record_key(ev), "amount")
        today = await self.redis.hgetall(self.day_key(acct.id, now))
        return State(
            currency=acct.currency, email=acct.email, status=acct.status, balance=acct.balance,
            threshold=acct.threshold, action=acct.action, policy_enabled=acct.policy_enabled,
            topup_amount=acct.topup_amount, has_card=acct.has_card,
            declines=int(text(raw[0]) or 0) if raw[0] else 0,
            decline_until=float(text(raw[1]) or 0) if raw[1] else 0.0,
            topups_today=sum(1 for k in today if text(k) != ev.crossing),
            amount_today=sum(int(v) for k, v in today.items() if text(k) != ev.crossing),
            started_amount=int(record) if record else 0)

    async def _topup(self, acct: Account, ev: Event, decision: Decision, now: float) -> bool:
        amount = decision.amount
        record = self.record_key(ev)
        day = self.day_key(acct.id, now)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(record, "amount", amount)
            pipe.hsetnx(record, "state", "charging")
            pipe.expire(record, RECORD_TTL)
            pipe.hset(day, ev.crossing, amount)
            pipe.expire(day, DAY_TTL)
            await pipe.execute()
        key = f"autotopup:{ev.crossing}"  # the ledger's idempotency keys are per account
        try:
            result = await self.gateway.charge(acct.id, acct.card_token, amount, acct.currency,
                                               gateway_key(ev))
        except (PaymentError, InputError) as exc:
            attempts = await self.redis.hincrby(record, "attempts", 1)
            permanent = isinstance(exc, InputError)
            if not permanent and attempts < self.max_attempts:
                metrics.TOPUPS.labels("retry").inc()
                log.warning("top-up %s for account %s: %s; will retry (attempt %s of %s)",
                            key, acct.id, exc, attempts, self.max_attempts)
                return False
            metrics.TOPUPS.labels("failed").inc()
            provider_key = gateway_key(ev)
            # The provider may have charged before it stopped answering: the admin looks
            # the charge up by its idempotency key and credits it by hand if it exists.
            log.error("top-up %s for account %s given up: %s; check the payment provider "
                      "for a charge with idempotency key %s and credit it with 'prepaid "
                      "topup %s AMOUNT --reference %s' if it was made", key, acct.id, exc,
                      provider_key, acct.id, provider_key)
            await self.redis.hset(record, "state", "failed")
            await self.redis.hdel(day, ev.crossing)
            await self._mail(acct, "topup_failed", mail_id("fail", ev), mail_context(
                acct, amount=format_amount(amount, acct.currency), reference=provider_key,
                reason="the payment provider could not be reached" if not permanent else str(exc),
                advice="please top up manually; if your card statement shows this payment, "
                       "contact support with the reference below and it will be credited"))
            return True
        if result.ok:
            return await self._credited(acct, ev, amount, key, result)
        return await self._declined(acct, ev, amount, key, result, now)

    async def _credited(self, acct: Account, ev: Event, amount: int, key: str,
                        result: ChargeResult) -> bool:
        change = await self.ledger.credit(acct.id, amount, key=key,
                                          ref=f"automatic top-up {result.charge_id}")
        await self.ledger.update(acct.id, declines="0", decline_until="0")
        await self.redis.hset(self.record_key(ev), "state", "credited")
        metrics.TOPUPS.labels("credited").inc()
        log.info("account %s topped up by %s (charge %s), balance %s", acct.id,
                 format_amount(amount, acct.currency), result.charge_id,
                 format_amount(change.balance, acct.currency))
        await self._mail(acct, "topup_receipt", mail_id("receipt", ev), mail_context(
            acct, amount=format_amount(amount, acct.currency),
            balance=format_amount(change.balance, acct.currency),
            reference=result.charge_id or key))
        return True

    async def _declined(self, acct: Account, ev: Event, amount: int, key: str,
                        result: ChargeResult, now: float) -> bool:
        record = self.record_key(ev)
        await self.redis.hdel(self.day_key(acct.id, now), ev.crossing)
        if await self.redis.hsetnx(record, "declined", result.status):  # count each once
            raw = await self.redis.hget(self._acct(acct.id), "declines")
            outcome = after_decline(int(raw or 0), self.caps, now)
            metrics.TOPUPS.labels(result.status).inc()
            fields = {"declines": str(outcome.declines),
                      "decline_until": f"{outcome.decline_until:.0f}"}
            if outcome.switch_to_email:
                fields["action"] = "email"
            await self.ledger.update(acct.id, **fields)
            await self.redis.hset(record, mapping={
                "state": "declined", "switched": "1" if outcome.switch_to_email else "0"})
            log.warning("top-up %s for account %s %s: %s (%s in a row)%s", key, acct.id,
                        result.status, result.reason, outcome.declines,
                        "; switched the account to e-mail warnings"
                        if outcome.switch_to_email else "")
        switched = await self.redis.hget(record, "switched") == b"1"
        after = await self.ledger.get(acct.id)
        advice = ("please approve the payment with your bank, or top up manually"
                  if result.status == "auth_required" else
                  "please check your card or store a new one, or top up manually")
        note = ("After repeated declines, automatic top-ups are switched off: we will only "
                "e-mail you when your balance is low until you store a working card and "
                "switch automatic top-ups on again.") if switched else ""
        await self._mail(after, "topup_failed", mail_id("fail", ev), mail_context(
            after, amount=format_amount(amount, acct.currency), reference=key,
            reason=result.reason or f"the card was {result.status}", advice=advice,
            switched=note))
        return True

    async def _mail(self, acct: Account, kind: str, mail_id: str, ctx: dict[str, str]) -> None:
        if not acct.email:
            log.info("account %s has no e-mail address; %s not sent", acct.id, kind)
            return
        msg = compose(self.templates, self.settings.smtp.sender, acct.email, kind, ctx, mail_id)
        await self.mail.enqueue(mail_id, msg)


def mail_id(kind: str, ev: Event) -> str:
    return f"{kind}:{ev.account}:{ev.crossing}"


def gateway_key(ev: Event) -> str:
    """The payment provider's idempotency key: unique across accounts, since a crossing id
    is an entry id of the account's own history and two accounts can share one."""
    return f"autotopup:{ev.account}:{ev.crossing}"


def _advice(reason: str) -> str:
    if "card" in reason and "stored" in reason:
        return "store a card for automatic top-ups, or top up manually"
    if "limit" in reason:
        return "top up manually; automatic top-ups resume tomorrow"
    return "please top up manually"


async def run(store: Store, stop: asyncio.Event) -> None:
    """Run one policy worker and one mail worker until ``stop`` is set (``prepaid serve``)."""
    settings = store.settings
    claim_idle_ms = int(settings.policy.claim_idle_seconds * 1000)
    gateway = make_gateway(settings, store.redis)
    worker = PolicyWorker(store.redis, store.ledger, settings, gateway,
                          claim_idle_ms=claim_idle_ms,
                          lock_seconds=settings.policy.topup_lock_seconds,
                          max_attempts=settings.policy.gateway_max_attempts,
                          sweep_seconds=settings.policy.sweep_seconds,
                          dead_letter_after=settings.policy.dead_letter_after)
    mailer = MailWorker(store.redis, settings.smtp, prefix=settings.redis.key_prefix,
                        claim_idle_ms=claim_idle_ms,
                        dead_letter_after=settings.policy.dead_letter_after)
    block_ms = max(50, min(500, int(settings.redis.timeout * 1000 / 2)))
    log.info("policy worker %s started (gateway %s)", worker.consumer, settings.payments.gateway)
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(worker.run(stop, block_ms), name="policy-worker")
        tasks.create_task(mailer.run(stop, block_ms), name="mail-worker")
    log.info("policy worker %s stopped", worker.consumer)
