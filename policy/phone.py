"""Top-ups the caller asks for in the IVR menu, charged from the stored card.

The menu (``agi/ivr.py``) cannot import this service; it appends a request to
``P:selfservice`` and polls the outcome key (``prepaid/selfservice.py``). This worker reads
the stream with the consumer group ``phone`` and charges with the rails of automatic
top-ups (:class:`policy.worker.PolicyWorker`, whose pieces it shares): one top-up in flight
per account (the same lock), the daily caps (a phone top-up counts in the same day as the
automatic ones), the decline back-off and the switch to e-mail after ``max_declines``,
receipts and decline notices through the mail queue.

Exactly once, by the request's key: the outcome key is claimed ``charging`` before
anything is charged (a menu that stopped waiting claimed it ``abandoned`` first: then
nothing is), the gateway key is ``ivrtopup:<account>:<key>`` and the ledger credit key
``ivrtopup:<key>``, the mail ids ``phone-receipt:<account>:<key>`` and
``phone-fail:<account>:<key>``.  A request found older than its ``wait`` (by Redis's clock)
is never started.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

import policy.worker
from policy.decide import Event, State, after_decline, topup_refusal
from policy.gateway import ChargeResult, Gateway, PaymentError
from policy.payments import make_gateway
from policy.worker import PolicyWorker, mail_context
from prepaid import metrics, selfservice
from prepaid.config import Settings
from prepaid.errors import InputError, UnknownAccount
from prepaid.ledger import Account, Ledger
from prepaid.money import format_amount
from prepaid.outage import OutageLog
from prepaid.redis_client import RedisClient
from prepaid.selfservice import TopupRequest, TopupResult
from prepaid.store import Store
from prepaid.streams import ConsumerGroup

log = logging.getLogger(__name__)

GROUP = "phone"


class PhoneTopups(PolicyWorker):
    """The policy worker's reader of phone requests: its own stream and group, the same
    rails.  A request that waits (the lock, a gateway retry) is tried again after
    ``retry_idle_ms``, short: a caller is waiting."""

    def __init__(self, client: RedisClient, ledger: Ledger, settings: Settings,
                 gateway: Gateway, *, consumer: str | None = None,
                 claim_idle_ms: int = 60_000, lock_seconds: int = 120, max_attempts: int = 5,
                 batch: int = 20, now: Callable[[], float] = time.time,
                 retry_idle_ms: int = 500, dead_letter_after: int = 5) -> None:
        super().__init__(client, ledger, settings, gateway, consumer=consumer,
                         claim_idle_ms=claim_idle_ms, lock_seconds=lock_seconds,
                         max_attempts=max_attempts, batch=batch, now=now,
                         dead_letter_after=dead_letter_after)
        self.redis_outage = OutageLog(log, "Redis (phone top-ups)")
        self.group = ConsumerGroup(client, selfservice.requests_key(ledger.prefix), GROUP,
                                   self.consumer, claim_idle_ms=self.claim_idle_ms,
                                   retry_idle_ms=retry_idle_ms, batch=self.batch,
                                   dead_letters=self.dead_letters,
                                   dead_letter_after=dead_letter_after)

    async def _sweep_if_due(self) -> None:
        """Nothing to sweep: requests are written straight to their stream."""

    async def handle(self, entry_id: str, fields: dict[str, str]) -> bool:
        """Act on one request; True when it may be acknowledged."""
        try:
            req = selfservice.parse_request(entry_id, fields)
        except InputError as exc:
            log.error("%s; dropping it", exc)
            return True
        token = f"{self.consumer}:ivr:{req.key}"
        lock = self.lock_key(req.account)
        if not await self._lock(keys=[lock], args=[token, self.lock_seconds]):
            log.info("top-up for account %s already in flight; phone request %s waits",
                     req.account, req.key)
            return False
        try:
            return await self._handle_request(req)
        finally:
            await self._unlock(keys=[lock], args=[token])

    async def _handle_request(self, req: TopupRequest) -> bool:
        ledger = self.ledger
        seen = await selfservice.read(ledger, req)
        if seen is None and await selfservice.expired(ledger, req):
            # Nobody waits for it any more: never started, so never charged.
            if await selfservice.claim(ledger, req, "abandoned") is None:
                log.info("phone top-up %s for account %s expired before it was started; "
                         "not charged", req.key, req.account)
            return True
        if seen is not None and seen.final:
            return True
        other = await selfservice.claim(ledger, req, "charging")
        if other is not None and other.state != "charging":
            log.info("phone top-up %s for account %s: %s; not charged", req.key, req.account,
                     other.state)
            return True
        try:
            acct = await ledger.get(req.account)
        except UnknownAccount:
            await selfservice.finish(ledger, req, TopupResult("refused",
                                                              reason="unknown account"))
            return True
        result = await self._charge(acct, req)
        if result is None:
            return False  # the gateway's answer is unknown: again, with the same keys
        await selfservice.finish(ledger, req, result)
        return True

    def _refusal(self, acct: Account, req: TopupRequest, state: State) -> str | None:
        caps = self.caps
        if acct.status != "active":
            return f"the account is {acct.status}"
        if req.amount not in caps.presets or req.amount > caps.max_topup:
            return "the amount is not one of the amounts offered"
        return topup_refusal(dataclasses.replace(state, topup_amount=req.amount), caps,
                             self.now())

    async def _charge(self, acct: Account, req: TopupRequest) -> TopupResult | None:
        now = self.now()
        ev = Event(f"ivr:{req.key}", acct.id, f"ivr:{req.key}", "topup", acct.balance,
                   acct.threshold, req.amount)
        state = await self._state(acct, ev, now)
        if not state.started_amount:
            refusal = self._refusal(acct, req, state)
            if refusal is not None:
                metrics.TOPUPS.labels("refused").inc()
                log.info("phone top-up %s for account %s refused: %s", req.key, acct.id,
                         refusal)
                return TopupResult("refused", acct.balance, refusal)
        amount = state.started_amount or req.amount
        record, day = self.record_key(ev), self.day_key(acct.id, now)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(record, "amount", amount)
            pipe.hsetnx(record, "state", "charging")
            pipe.expire(record, policy.worker.RECORD_TTL)
            pipe.hset(day, ev.crossing, amount)
            pipe.expire(day, policy.worker.DAY_TTL)
            await pipe.execute()
        gateway_key = f"ivrtopup:{acct.id}:{req.key}"
        try:
            charged = await self.gateway.charge(acct.id, acct.card_token, amount,
                                                acct.currency, gateway_key)
        except (PaymentError, InputError) as exc:
            return await self._not_charged(acct, req, ev, amount, exc)
        if charged.ok:
            return await self._phone_credited(acct, req, ev, amount, charged)
        return await self._phone_declined(acct, req, ev, amount, charged, now)

    async def _not_charged(self, acct: Account, req: TopupRequest, ev: Event, amount: int,
                           exc: Exception) -> TopupResult | None:
        record = self.record_key(ev)
        attempts = await self.redis.hincrby(record, "attempts", 1)
        permanent = isinstance(exc, InputError)
        if not permanent and attempts < self.max_attempts:
            metrics.TOPUPS.labels("retry").inc()
            log.warning("phone top-up %s for account %s: %s; will retry (attempt %s of %s)",
                        req.key, acct.id, exc, attempts, self.max_attempts)
            return None
        metrics.TOPUPS.labels("failed").inc()
        gateway_key = f"ivrtopup:{acct.id}:{req.key}"
        log.error("phone top-up %s for account %s given up: %s; check the payment provider "
                  "for a charge with idempotency key %s and credit it with 'prepaid topup %s "
                  "AMOUNT --reference %s' if it was made", req.key, acct.id, exc, gateway_key,
                  acct.id, gateway_key)
        await self.redis.hset(record, "state", "failed")
        await self.redis.hdel(self.day_key(acct.id, self.now()), ev.crossing)
        reason = "the payment provider could not be reached" if not permanent else str(exc)
        await self._mail(acct, "phone_failed", f"phone-fail:{acct.id}:{req.key}", mail_context(
            acct, amount=format_amount(amount, acct.currency), reference=gateway_key,
            reason=reason, advice="please try again later; if your card statement shows this "
            "payment, contact support with the reference below and it will be credited"))
        return TopupResult("failed", acct.balance, reason)

    async def _phone_credited(self, acct: Account, req: TopupRequest, ev: Event, amount: int,
                              charged: ChargeResult) -> TopupResult:
        change = await self.ledger.credit(acct.id, amount, key=f"ivrtopup:{req.key}",
                                          ref=f"phone top-up {charged.charge_id}")
        await self.ledger.update(acct.id, declines="0", decline_until="0")
        await self.redis.hset(self.record_key(ev), "state", "credited")
        metrics.TOPUPS.labels("credited").inc()
        log.info("account %s topped up by phone by %s (charge %s), balance %s", acct.id,
                 format_amount(amount, acct.currency), charged.charge_id,
                 format_amount(change.balance, acct.currency))
        await self._mail(acct, "phone_receipt", f"phone-receipt:{acct.id}:{req.key}",
                         mail_context(acct, amount=format_amount(amount, acct.currency),
                                      balance=format_amount(change.balance, acct.currency),
                                      reference=charged.charge_id or f"ivrtopup:{req.key}"))
        return TopupResult("credited", change.balance)

    async def _phone_declined(self, acct: Account, req: TopupRequest, ev: Event, amount: int,
                              charged: ChargeResult, now: float) -> TopupResult:
        record = self.record_key(ev)
        await self.redis.hdel(self.day_key(acct.id, now), ev.crossing)
        if await self.redis.hsetnx(record, "declined", charged.status):  # count each once
            raw = await self.redis.hget(self._acct(acct.id), "declines")
            outcome = after_decline(int(raw or 0), self.caps, now)
            metrics.TOPUPS.labels(charged.status).inc()
            fields = {"declines": str(outcome.declines),
                      "decline_until": f"{outcome.decline_until:.0f}"}
            if outcome.switch_to_email and acct.action == "topup":
                fields["action"] = "email"
            await self.ledger.update(acct.id, **fields)
            await self.redis.hset(record, mapping={
                "state": "declined", "switched": "1" if "action" in fields else "0"})
            log.warning("phone top-up %s for account %s %s: %s (%s in a row)", req.key,
                        acct.id, charged.status, charged.reason, outcome.declines)
        switched = await self.redis.hget(record, "switched") == b"1"
        after = await self.ledger.get(acct.id)
        note = ("After repeated declines, automatic top-ups are switched off: we will only "
                "e-mail you when your balance is low until you store a working card and "
                "switch automatic top-ups on again.") if switched else ""
        advice = ("please approve the payment with your bank, or top up another way"
                  if charged.status == "auth_required" else
                  "please check your card or store a new one")
        await self._mail(after, "phone_failed", f"phone-fail:{acct.id}:{req.key}",
                         mail_context(after, amount=format_amount(amount, acct.currency),
                                      reference=f"ivrtopup:{req.key}", advice=advice,
                                      reason=charged.reason or f"the card was {charged.status}",
                                      switched=note))
        return TopupResult("declined", after.balance, charged.reason or charged.status)


async def serve(store: Store, stop: asyncio.Event) -> None:
    """The policy service of ``prepaid serve``: the policy and mail workers
    (:func:`policy.worker.run`) and the reader of phone top-up requests."""
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(policy.worker.run(store, stop), name="policy")
        tasks.create_task(run_phone(store, stop), name="phone-topups")


async def run_phone(store: Store, stop: asyncio.Event) -> None:
    settings = store.settings
    worker = PhoneTopups(store.redis, store.ledger, settings,
                         make_gateway(settings, store.redis),
                         claim_idle_ms=int(settings.policy.claim_idle_seconds * 1000),
                         lock_seconds=settings.policy.topup_lock_seconds,
                         max_attempts=settings.policy.gateway_max_attempts,
                         dead_letter_after=settings.policy.dead_letter_after)
    block_ms = max(50, min(500, int(settings.redis.timeout * 1000 / 2)))
    log.info("phone top-up worker %s started", worker.consumer)
    await worker.run(stop, block_ms)
