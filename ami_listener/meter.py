"""The I/O side of metering: carries out the tracker's actions on the ledger, Redis and AMI.

One lock serializes events and ticks, so each call sees one ordered stream.  Redis outages
are logged once (and the recovery once); what could not be done is asked for again by the
tracker on the next tick, and ledger idempotency keys make every retry safe:

- block 1: ``settle(account, "call:<ref>", block_cost(rate, 1), key="blk:<ref>:1")``
- block n: ``debit(account, block_cost(rate, n), key="blk:<ref>:<n>")``
- a block paid for time the call never reached (blocks are paid ahead of their start, and
  the CDR decides what the call cost): ``credit(..., key="rfd:<ref>:<n>")``
- never answered: ``release(account, "call:<ref>", key="rel:<ref>")``

What to charge, refund or release at settlement is the tracker's (:class:`Finish`); a
block the CDR reached is owed, so the meter charges it with ``force`` should the credit
refuse it, and says so.  A settled call goes to the :class:`Reporter`: the account's call
history (:class:`CallHistory`) in production, a recorder in tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from ami_listener.cdrfile import CdrFile
from ami_listener.protocol import timestamp_us
from ami_listener.tracker import (
    Action,
    CallInfo,
    CheckCredit,
    Cutoff,
    Extend,
    FindCdr,
    Finish,
    Lookup,
    NoteCdr,
    PayBlock,
    ReleaseHold,
    Report,
    Settlement,
    Tracker,
)
from prepaid import callrecord, holds, keys, lua, metrics
from prepaid.callrecord import WARNING_FILE, CallRecord, hold_id, record_key, record_pattern
from prepaid.errors import LedgerError, StoreUnavailable, UnknownAccount
from prepaid.ledger import Ledger
from prepaid.redis_client import REDIS_ERRORS, RedisClient, text

log = logging.getLogger(__name__)

HISTORY_MAX = 10_000  # call records kept per account

RECOVER_BATCH = 500  # call records read in one round trip after a (re)connect

# 3. the call record is marked ended (callrecord.ended).  Recovery completes a record left
#    'finished' but not 'ended' by a crash (see Meter.recover).


# Actions carried out without Redis (AMI, the CDR file): done even while it is away.
CONCURRENT_CALLS = 32  # calls whose ledger steps run side by side (within [redis] max_connections)
WITHOUT_REDIS: frozenset[type[Action]] = frozenset({Extend, Cutoff, FindCdr})


class Commands(Protocol):
    """Where AMI actions go (the live connection, or a list in tests)."""

    def send(self, name: str, **headers: str) -> str: ...


class Discard:
    """No AMI link at the moment: actions are dropped (the tracker repeats what matters)."""

    def send(self, name: str, **headers: str) -> str:
        log.debug("no AMI link; %s not sent", name)
        return ""


class OnceCommands:
    """Actions over a link that may break at any send: the first failure is logged, the
    rest of that link's life only counted (the runner reconnects and resumes)."""

    def __init__(self, inner: Commands) -> None:
        self.inner = inner
        self.failed = 0

    def send(self, name: str, **headers: str) -> str:
        try:
            return self.inner.send(name, **headers)
        except ConnectionError as exc:
            if not self.failed:
                log.warning("AMI %s not sent: %s (further failures not logged)", name, exc)
            self.failed += 1
            return ""


def calls_key(ledger: Ledger, account: str) -> str:
    """The account's call history: a stream, newest last, at most about HISTORY_MAX."""
    return keys.account_calls(ledger.prefix, account)


def logged_key(ledger: Ledger, account: str) -> str:
    """References already in the call history (sorted set by time), so each is logged once."""
    return keys.account_calls_logged(ledger.prefix, account)


class Reporter(Protocol):
    """Where a settled call goes (cacofonisk's reporter): the call history in production,
    a recorder in tests and benchmarks.  May raise StoreUnavailable: reported again."""

    async def settled(self, settlement: Settlement) -> None: ...


class CallHistory:
    """The production reporter: the call record keeps the first finisher's settlement, the
    account's call history logs it once, the record is marked ended (see lua.CALLS_LOG)."""

    def __init__(self, ledger: Ledger, prefix: str = "prepaid") -> None:
        self.ledger = ledger
        self.redis: RedisClient = ledger.redis
        self.prefix = prefix
        self._log = self.redis.register_script(lua.CALLS_LOG)

    async def settled(self, settlement: Settlement) -> None:
        s = settlement
        stored = await callrecord.finish(self.redis, self.prefix, s.ref, json.dumps(s.fields()))
        first = _settlement(stored) if stored is not None else None
        await self.complete(s.ref, s.account, first or s.fields())  # the first finisher's

    async def complete(self, ref: str, account: str, fields: dict[str, str]) -> None:
        """Steps 2 and 3 of a finished call (see lua.CALLS_LOG): log it once, mark it ended."""
        args = [x for kv in fields.items() for x in kv]
        now = f"{time.time():.3f}"
        await _call(self._log(
            keys=[calls_key(self.ledger, account), logged_key(self.ledger, account)],
            args=[ref, now, str(HISTORY_MAX), *args]))
        await callrecord.ended(self.redis, self.prefix, ref, now)


class Meter:
    """Runs tracker actions against Redis and AMI; feed it events and ticks."""

    def __init__(self, ledger: Ledger, *, prefix: str = "prepaid", warning_seconds: int = 60,
                 commands: Commands | None = None, warning_context: str = "",
                 system_name: str = "", grace_seconds: int = 30,
                 cdr_file: Path | None = None, reporter: Reporter | None = None,
                 max_hold_seconds: float = 3 * 3600 + callrecord.EXPIRY_MARGIN) -> None:
        self.ledger = ledger
        # A hold of a call authorized longer ago than this is given back (a backstop).
        self.max_hold_seconds = max_hold_seconds
        self._suspects: set[str] = set()  # holds found orphaned once (see holds.reap)
        self.redis: RedisClient = ledger.redis
        self.prefix = prefix
        self.tracker = Tracker(warning_seconds=warning_seconds, grace_seconds=grace_seconds)
        self.commands: Commands = commands or Discard()
        self.cdr_file = CdrFile(cdr_file) if cdr_file else None
        self.warning_context = warning_context
        self.system_name = system_name
        self.down = False
        self.history = CallHistory(ledger, prefix)
        self.reporter: Reporter = reporter or self.history
        self.errors = 0
        self._lock = asyncio.Lock()
        self._handlers: dict[type[Any], Callable[[Any], Awaitable[list[Action]]]] = {
            Lookup: self._lookup, PayBlock: self._pay, ReleaseHold: self._release_hold,
            Finish: self._finish_call, Extend: self._extend, Cutoff: self._cutoff,
            CheckCredit: self._check_credit, FindCdr: self._find_cdr, NoteCdr: self._note_cdr,
            Report: self._report}

    # -- inputs ---------------------------------------------------------------------
    async def handle(self, msg: dict[str, str], received_us: int | None = None) -> None:
        """One AMI event, read at ``received_us`` (its time when it carries no Timestamp)."""
        async with self._lock:
            await self._run(self.tracker.feed(msg, received_us))

    async def tick(self, now_us: int) -> None:
        async with self._lock:
            if self.down and not await self._probe():
                self.tracker.now = max(self.tracker.now, now_us)  # act once Redis is back
                return
            await self._run(self.tracker.tick(now_us))
            metrics.LIVE_CALLS.set(sum(1 for c in self.tracker.calls.values() if c.info))

    async def reap(self, now: float | None = None) -> int:
        """Give back the holds of this server's calls that nobody meters (prepaid.holds);
        returns how many."""
        async with self._lock:
            try:
                released, self._suspects = await holds.reap(
                    self.ledger, system_name=self.system_name, live=set(self.tracker.calls),
                    max_age=self.max_hold_seconds, suspects=self._suspects, now=now)
            except StoreUnavailable as exc:
                self._outage(exc)
                return 0
            except LedgerError as exc:
                log.error("reaping orphaned holds failed: %s", exc)
                return 0
        metrics.HOLDS_REAPED.inc(len(released))
        return len(released)

    async def recover(self) -> int:
        """After a (re)start or reconnect: resume every call Redis still holds as live.

        Afterwards send ``CoreShowChannels``; its ``CoreShowChannelsComplete`` tells the
        tracker which of these calls ended while we were away.  Returns how many resumed.
        """
        async with self._lock:
            self.tracker.begin_listing()
            try:
                records, unlogged = await self._live_records()
                for ref, account, fields in unlogged:  # settled before a crash, not logged
                    log.info("call %s: completing its settlement record", ref)
                    await self.history.complete(ref, account, fields)
            except StoreUnavailable as exc:
                self._outage(exc)
                return 0
            count = 0
            for ref, info in records:
                if ref not in self.tracker.calls:
                    count += 1
                await self._run(self.tracker.attach(ref, info, resumed=True))
            return count

    async def _live_records(self) -> tuple[list[tuple[str, CallInfo]],
                                           list[tuple[str, str, dict[str, str]]]]:
        """The live calls, and the settled calls whose record was not completed."""
        out = []
        unlogged = []
        try:
            keys = [k async for k in self.redis.scan_iter(record_pattern(self.prefix),
                                                          count=1000)]
            keys = [k for k in keys if on_server(text(k).rsplit(":", 1)[1], self.system_name)]
            for start in range(0, len(keys), RECOVER_BATCH):
                batch = keys[start:start + RECOVER_BATCH]
                # One round trip a batch: recovery runs beside the AMI reader, but a
                # record at a time it took seconds with an hour of ended calls.
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key in batch:
                        pipe.hgetall(key)
                    hashes = await pipe.execute()
                for key, raw in zip(batch, hashes, strict=True):
                    h = {text(k): text(v) for k, v in raw.items()}
                    ref = text(key).rsplit(":", 1)[1]
                    if "finished" in h:
                        if h.get("state") != "ended" and h.get("settlement"):
                            fields = _settlement(h["settlement"])
                            if fields is not None:
                                unlogged.append((ref, fields["account"], fields))
                        continue
                    if h.get("state") not in ("authorized", "answered"):
                        continue
                    info = _info(h)
                    if info is not None:
                        out.append((ref, info))
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"Redis is unavailable listing live calls: {exc}") from exc
        return out, unlogged

    # -- carrying out actions -------------------------------------------------------
    async def _run(self, actions: Iterable[Action]) -> None:
        """Each call's actions in order; different calls' side by side (a tick pays the blocks
        of every live call: one after another, their round trips would add up)."""
        chains: dict[str, list[Action]] = {}
        for action in actions:
            chains.setdefault(action.ref, []).append(action)
        if len(chains) <= 1:
            for chain in chains.values():
                await self._run_chain(chain)
            return
        limit = asyncio.Semaphore(CONCURRENT_CALLS)

        async def bounded(chain: list[Action]) -> None:
            async with limit:
                await self._run_chain(chain)

        await asyncio.gather(*(bounded(chain) for chain in chains.values()))

    async def _run_chain(self, queue: list[Action]) -> None:
        while queue:
            action = queue.pop(0)
            try:
                queue += await self._do(action)
            except StoreUnavailable as exc:
                self._outage(exc)
                self.tracker.failed(action.ref)
            except Exception:
                self.errors += 1
                log.exception("metering %s failed", action)
                self.tracker.failed(action.ref)

    async def _do(self, action: Action) -> list[Action]:
        kind = type(action)
        if kind not in WITHOUT_REDIS and self.down and not await self._probe():
            self.tracker.failed(action.ref)
            return []
        return await self._handlers[kind](action)

    async def _release_hold(self, action: ReleaseHold) -> list[Action]:
        await self._release(action.ref, action.account)
        self.tracker.released(action.ref)
        return []

    async def _finish_call(self, f: Finish) -> list[Action]:
        for block in f.charges:
            try:
                await self._pay_block(f.account, f.ref, block.n, block.amount, force=False)
            except LedgerError as exc:
                if exc.code != "NO_CREDIT":
                    raise
                await self._pay_block(f.account, f.ref, block.n, block.amount, force=True)
                self.tracker.past_credit(f.ref, block.n)
                log.warning("call %s: block %s (%s) charged past the credit: the CDR says "
                            "%s s", f.ref, block.n, block.amount, f.duration)
        for block in f.refunds:
            log.debug("call %s: refunding block %s paid for time not reached", f.ref, block.n)
            await self.ledger.credit(f.account, block.amount, key=f"rfd:{f.ref}:{block.n}",
                                     ref=f"call {f.ref} block {block.n} not reached")
        if f.release:
            await self._release(f.ref, f.account)
        return self.tracker.charged(f.ref)

    async def _report(self, action: Report) -> list[Action]:
        s = action.settlement
        await self.reporter.settled(s)
        self.tracker.finished(action.ref)
        log.debug("call %s settled: %s s billed %s, cost %s", s.ref, s.duration, s.billed,
                  s.cost)
        return []

    async def _cutoff(self, action: Cutoff) -> list[Action]:
        metrics.CUTOFFS.inc()
        log.info("call %s still up past its paid time (block %s refused); hanging up",
                 action.ref, action.n)
        if action.channel:
            self.commands.send("Hangup", Channel=action.channel, Cause="16")
        return []

    async def _note_cdr(self, action: NoteCdr) -> list[Action]:
        await callrecord.note_cdr(self.redis, self.prefix, action.ref, action.billsec)
        return []

    async def _find_cdr(self, action: FindCdr) -> list[Action]:
        billsec = None
        if self.cdr_file is not None:
            try:
                billsec = await self.cdr_file.billsec(action.ref)
            except OSError as exc:
                self.cdr_file.outage(exc)
        return self.tracker.cdr_found(action.ref, billsec, again=self.cdr_file is not None)

    async def _lookup(self, action: Lookup) -> list[Action]:
        try:
            raw = await self.redis.hgetall(record_key(self.prefix, action.ref))
        except REDIS_ERRORS as exc:
            self.tracker.failed(action.ref)
            raise StoreUnavailable(f"Redis is unavailable reading call {action.ref}: {exc}"
                                   ) from exc
        h = {text(k): text(v) for k, v in raw.items()}
        info = _info(h) if h and "finished" not in h else None
        if info is None:
            if h:
                log.debug("call record %s unusable or already finished", action.ref)
            self.tracker.not_prepaid(action.ref)
            return []
        return self.tracker.attach(action.ref, info)

    async def _pay(self, action: PayBlock) -> list[Action]:
        ref, n = action.ref, action.n
        try:
            await self._pay_block(action.account, ref, n, action.amount, force=False)
        except LedgerError as exc:
            if exc.code == "NO_CREDIT" or isinstance(exc, UnknownAccount):
                log.info("call %s: block %s (%s) refused: %s", ref, n, action.amount, exc)
                return self.tracker.refused(ref, n)
            if exc.code != "IDEM_CONFLICT":
                raise
            log.warning("call %s: block %s was already paid with another amount", ref, n)
        await callrecord.answered(self.redis, self.prefix, ref, answered_us=action.answered_us,
                                  blocks_paid=n)
        return self.tracker.paid(ref, n)

    async def _pay_block(self, account: str, ref: str, n: int, amount: int, *,
                         force: bool) -> None:
        key = f"blk:{ref}:{n}"
        if amount <= 0:
            if n == 1:  # a free first block still ends the reservation
                await self._release(ref, account)
            return
        if n == 1:
            await self.ledger.settle(account, hold_id(ref), amount, key=key, ref=f"call {ref}",
                                     force=force)
        else:
            await self.ledger.debit(account, amount, key=key, ref=f"call {ref}", force=force)
        metrics.DEBITS.inc()
        metrics.DEBITED_MICROS.inc(amount)

    async def _release(self, ref: str, account: str) -> None:
        try:
            await self.ledger.release(account, hold_id(ref), key=f"rel:{ref}",
                                      ref=f"call {ref} not answered")
        except LedgerError as exc:
            if exc.code != "NO_HOLD" and not isinstance(exc, UnknownAccount):
                raise

    async def _extend(self, action: Extend) -> list[Action]:
        # While blocks are paid the limit runs [ami] grace_seconds past the paid time, so a
        # listener that dies drops no call; once a block is refused it is the paid time
        # itself, and Asterisk ends the call there. Fractional seconds: Asterisk takes them.
        if action.channel:
            self.commands.send("Setvar", Channel=action.channel, Variable="TIMEOUT(absolute)",
                               Value=f"{action.ms / 1000:.3f}")
        if action.exact:
            log.info("call %s: the next block cannot be paid; it ends in %.1f s", action.ref,
                     action.ms / 1000)
        return []

    async def _check_credit(self, action: CheckCredit) -> list[Action]:
        # The dialplan warns by itself (Dial's L()) where the authorization's paid time ends.
        # Only with [ami] warning_context set (and write=originate for the AMI user) does the
        # listener whisper a warning for a credit that runs out elsewhere: spent by another
        # call, or extended by a top-up after L() warned.
        if not self.warning_context or action.foreseen or not action.channel:
            return []
        account = await self.ledger.get(action.account)
        if account.available >= action.amount:
            return []
        log.info("call %s: credit runs out at block %s, not where its authorization "
                 "foresaw; warning the caller", action.ref, action.n)
        # A Local channel plays the prompt and whispers it to the caller through ChanSpy.
        self.commands.send("Originate", Channel=f"Local/s@{self.warning_context}/n",
                           Application="ChanSpy", Data=f"{action.channel},qwE",
                           Async="true", Variable=f"PREPAID_WARNING_FILE={WARNING_FILE}")
        return []

    # -- Redis health -----------------------------------------------------------------
    def _outage(self, exc: Exception) -> None:
        if not self.down:
            log.warning("metering paused, Redis unavailable: %s; retrying every tick", exc)
        self.down = True

    async def _probe(self) -> bool:
        try:
            await self.redis.ping()
        except REDIS_ERRORS:
            return False
        self.down = False
        log.info("Redis is back; metering resumed")
        return True


_PREFIXED_UNIQUEID = re.compile(r"^(.+)-[0-9]+\.[0-9]+$")


def on_server(uniqueid: str, system_name: str) -> bool:
    """Whether a call belongs to this Asterisk: with ``systemname`` set, Asterisk prefixes
    every uniqueid with it (``pbx-a-1700000000.12``); a server without one owns the
    unprefixed uniqueids."""
    match = _PREFIXED_UNIQUEID.match(uniqueid)
    return (match.group(1) if match else "") == system_name


def _info(h: dict[str, str]) -> CallInfo | None:
    try:
        record = CallRecord.from_hash(h)
        answered = h.get("answered_at", "")
        noted = h.get("cdr_billsec", "")
        return CallInfo(record.account, record.number, record.rate, record.hold,
                        record.channel, timestamp_us(answered) if answered else None,
                        int(h.get("blocks_paid", "0") or 0),
                        int(noted) if noted.isdigit() else None,
                        max_seconds=record.max_seconds, plan=record.plan)
    except (KeyError, ValueError, TypeError) as exc:
        log.debug("unusable call record: %s", exc)
        return None


def _settlement(raw: str) -> dict[str, str] | None:
    try:
        fields = json.loads(raw)
    except ValueError:
        fields = None
    if not isinstance(fields, dict) or not fields.get("account") or not all(
            isinstance(v, str) for v in fields.values()):
        log.error("call record with an unusable settlement %.80r; not logged", raw)
        return None
    return {str(k): v for k, v in fields.items()}


async def _call(coro: object) -> object:
    try:
        return await coro  # type: ignore[misc]
    except REDIS_ERRORS as exc:
        raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc

