"""The audit behind ``prepaid verify``: every account's balance, holds, history and calls,
read back and checked against each other.

A mismatch is one of:

- ``balance``: the account's balance (or held) is not what its history adds up to;
- ``history``: a history entry's balance is not the entries before it plus its amount;
- ``held``: the account's held amount is not the sum of its holds;
- ``hold``: a hold without a live call (its record is gone, released, ended or another
  account's), seen twice ``grace`` seconds apart (a call being authorized has its hold a
  moment before its record);
- ``call``: a settled call whose ledger charges differ from its cost, or whose cost is not
  what its rate gives for its billed time;
- ``idempotency``: an idempotency key applied twice (two history entries carry it);
- ``archive``: the archive files (prepaid/archive.py) end short of what was archived.

An account's archived history and calls are read from the files first (``archive``, the
directory; None: the check starts at the archived balance and leaves out the calls whose
charges may be in the archive).

Cheap enough to run hourly: accounts are found with SCAN (every node of a Cluster), read
in batches with pipelined commands, and each history is streamed page by page, so memory
follows one batch, not the database.  :class:`AccountCheck` is the pure part.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prepaid import archive, callrecord, keys, lua
from prepaid.archive import id_key
from prepaid.errors import StoreUnavailable, UnknownAccount
from prepaid.holds import CALL_HOLD, LIVE_STATES
from prepaid.ledger import Ledger, check_account_id
from prepaid.rating import billed_seconds, cost_of_billed, rate_from_json
from prepaid.redis_client import REDIS_ERRORS, text
from prepaid.scan import account_batches

KINDS = ("balance", "history", "held", "hold", "call", "idempotency", "archive")
BATCH = 200  # accounts read per round of pipelines
PAGE = 1000  # stream entries per XRANGE
GRACE = 2.0  # seconds before a hold without a live call is counted (see above)
# Idempotency keys of a call's charges: block n paid, block n refunded ("blk:<ref>:<n>").
CHARGE_KEYS = ("blk:", "rfd:")

Fields = dict[str, str]


@dataclass(frozen=True, slots=True)
class Mismatch:
    account: str
    kind: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"account": self.account, "kind": self.kind, "detail": self.detail}


@dataclass(slots=True)
class _Call:
    ref: str
    cost: int
    duration: int
    billed: int
    tariff: str


@dataclass(slots=True)
class AccountCheck:
    """The checks of one account, fed its calls, then its history in order, then the
    snapshot of its hash and holds (pure: no I/O)."""

    account: str
    balance: int = 0  # the history's running sum
    held: int = 0  # the last entry's held
    entries: int = 0
    found: list[Mismatch] = field(default_factory=list)
    _keys: dict[str, str] = field(default_factory=dict)  # idempotency key -> first entry
    _charges: dict[str, int] = field(default_factory=dict)  # call ref -> net charged
    _calls: list[_Call] = field(default_factory=list)
    calls_after_ms: int = 0  # calls answered before this may have charges not read

    def resume(self, mark: Fields) -> None:
        """Start from the archived part's last balance (its entries not read)."""
        self.balance = int(mark.get("history_balance", "0") or 0)
        self.held = int(mark.get("history_held", "0") or 0)
        if mark.get("history"):
            self.calls_after_ms = id_key(mark["history"])[0]

    def _add(self, kind: str, detail: str) -> None:
        self.found.append(Mismatch(self.account, kind, detail))

    def call(self, entry_id: str, f: Fields) -> None:
        try:
            began = float(f.get("answered") or f.get("ended") or 0) * 1000
            if began and began <= self.calls_after_ms:
                return  # its charges may be in the archive, which is not read
            self._calls.append(_Call(f["ref"], int(f["cost"]), int(f["duration"]),
                                     int(f["billed"]), f.get("tariff", "")))
        except (KeyError, ValueError):
            self._add("call", f"call history entry {entry_id} is unreadable: {f!r:.120}")

    def entry(self, entry_id: str, f: Fields) -> None:
        """One history entry, oldest first."""
        try:
            amount, balance, held = int(f["amount"]), int(f["balance"]), int(f["held"])
        except (KeyError, ValueError):
            self._add("history", f"history entry {entry_id} is unreadable: {f!r:.120}")
            return
        expected = self.balance + amount
        if expected != balance:
            self._add("history", f"history entry {entry_id} ({f.get('kind', '?')} {amount}) "
                      f"says balance {balance}, the entries before it sum to {expected}")
        # Go on from what the entry says, so one bad entry is reported once.
        self.balance, self.held = balance, held
        self.entries += 1
        key = f.get("key", "")
        if key:
            first = self._keys.setdefault(key, entry_id)
            if first != entry_id:
                self._add("idempotency", f"idempotency key {key!r} applied twice: history "
                          f"entries {first} and {entry_id}")
            if key.startswith(CHARGE_KEYS):
                ref = key[4:].rpartition(":")[0]
                self._charges[ref] = self._charges.get(ref, 0) - amount

    def finish(self, account: Fields, holds: dict[str, int]) -> list[Mismatch]:
        """Compare the account's hash and holds (read with the last entry fed) and check
        the settled calls against their charges and rates."""
        balance, held = int(account.get("balance", "0")), int(account.get("held", "0"))
        if balance != self.balance:
            self._add("balance", f"balance is {balance} but the history ({self.entries} "
                      f"entries) sums to {self.balance}")
        if held != self.held:
            self._add("balance", f"held is {held} but the last history entry says {self.held}")
        if held != sum(holds.values()):
            self._add("held", f"held is {held} but the {len(holds)} holds sum to "
                      f"{sum(holds.values())}")
        for c in self._calls:
            self._check_call(c)
        return self.found

    def _check_call(self, c: _Call) -> None:
        charged = self._charges.get(c.ref, 0)
        if charged != c.cost:
            self._add("call", f"call {c.ref} cost {c.cost} but its ledger charges sum to "
                      f"{charged}")
        if not c.tariff:  # logged before calls carried their rate
            return
        try:
            rate = rate_from_json(c.tariff)
        except (ValueError, TypeError):
            self._add("call", f"call {c.ref} has an unreadable rate {c.tariff!r:.80}")
            return
        billed = billed_seconds(rate, c.duration)
        expected = cost_of_billed(rate, billed)
        if (billed, expected) != (c.billed, c.cost):
            self._add("call", f"call {c.ref}: rate {rate.prefix} {rate.name} gives {billed} s "
                      f"billed and cost {expected} for {c.duration} s, the call says "
                      f"{c.billed} s and {c.cost}")


def hold_problem(account: str, hold: str, record: list[Any] | None) -> str:
    """Why ``hold`` is not a live call's ('' if it is); ``record`` is its call record's
    [account, state] (None or [None, None] when there is none)."""
    if not hold.startswith(CALL_HOLD):
        return "it is not a call's hold"
    owner, state = (text(v) if v is not None else "" for v in (record or [None, None]))
    if not state:
        return "its call has no record"
    if owner != account:
        return f"its call's record is account {owner!r}'s"
    if state not in LIVE_STATES:
        return f"its call's record says {state}"
    return ""


def _fields(raw: Any) -> Fields:
    """A stream entry's or hash's fields (a dict, or a flat list from a script)."""
    if isinstance(raw, dict):
        return {text(k): text(v) for k, v in raw.items()}
    items = list(raw or [])
    return {text(items[i]): text(items[i + 1]) for i in range(0, len(items) - 1, 2)}


class Audit:
    """``prepaid verify``: :meth:`run` yields every mismatch; ``accounts`` counts the
    accounts checked."""

    def __init__(self, ledger: Ledger, *, batch: int = BATCH, page: int = PAGE,
                 grace: float = GRACE, archive: Path | None = None) -> None:
        self.ledger = ledger
        self.archive = archive
        self.redis = ledger.redis
        self.prefix = ledger.prefix
        self.batch, self.page, self.grace = batch, page, grace
        self.accounts = 0
        self._suspects: dict[tuple[str, str], float] = {}  # (account, hold) -> first seen

    async def run(self, account: str | None = None) -> AsyncIterator[Mismatch]:
        try:
            if account is not None:
                check_account_id(account)
                found = await self._batch([account])
                if not self.accounts:
                    raise UnknownAccount(account)
                for m in found:
                    yield m
            else:
                async for ids in account_batches(self.redis, self.prefix, self.batch):
                    for m in await self._batch(ids):
                        yield m
            for m in await self._recheck():
                yield m
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"Redis at {self.ledger.url or 'the configured URL'} is "
                                   f"unavailable during verify: {exc}") from exc

    async def _pipe(self, commands: Iterable[tuple[str, ...]]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for cmd in commands:
            pipe.execute_command(*cmd)
        return list(await pipe.execute())

    async def _pages(self, stream_keys: dict[str, str], ends: dict[str, str],
                     after: dict[str, str]) -> AsyncIterator[tuple[str, list[tuple[str, Fields]]]]:
        """(account, page) of each account's stream, oldest first, every account's next page
        in one pipeline, after ``after[account]`` (an id; all when none) up to
        ``ends[account]`` (an entry id, or '+')."""
        start = {a: "(" + after[a] if after.get(a) else "-" for a in stream_keys
                 if ends.get(a, "+")}
        while start:
            accounts = list(start)
            replies = await self._pipe(
                ("XRANGE", stream_keys[a], start[a], ends.get(a, "+"), "COUNT", str(self.page))
                for a in accounts)
            for a, rows in zip(accounts, replies, strict=True):
                page = [(text(i), _fields(f)) for i, f in rows or []]
                if page:
                    yield a, page
                if len(page) < self.page:
                    del start[a]
                else:
                    start[a] = "(" + page[-1][0]

    async def _batch(self, ids: list[str]) -> list[Mismatch]:
        checks = {a: AccountCheck(a) for a in ids}
        marks = {a: _fields(m) for a, m in zip(ids, await self._pipe(
            ("HGETALL", keys.archive_mark(self.prefix, a)) for a in ids), strict=True)}
        for a, mark in marks.items():
            if mark:
                self._archived(checks[a], mark)
        # The calls first: a call is logged after its last charge, so every charge of a
        # call read here is in the history read next.
        calls = {a: keys.account_calls(self.prefix, a) for a in ids}
        after_calls = {a: m.get("calls", "") for a, m in marks.items()}
        async for a, page in self._pages(calls, {}, after_calls):
            for entry_id, f in page:
                checks[a].call(entry_id, f)
        snaps = await self._pipe(
            ("EVAL", lua.AUDIT_SNAPSHOT, "3", self.ledger.account_key(a),
             *self.ledger.keys(a)[1:3]) for a in ids)
        accounts, holds, ends = {}, {}, {}
        for a, (acct, hold_list, last) in zip(ids, snaps, strict=True):
            if not acct:  # deleted since the scan
                continue
            accounts[a] = _fields(acct)
            holds[a] = {k: int(v) for k, v in _fields(hold_list).items()}
            ends[a] = text(last[0][0]) if last else ""
        history = {a: self.ledger.keys(a)[2] for a in accounts}
        after_history = {a: marks[a].get("history", "") for a in accounts}
        async for a, page in self._pages(history, ends, after_history):
            for entry_id, f in page:
                checks[a].entry(entry_id, f)
        out: list[Mismatch] = []
        for a in accounts:
            self.accounts += 1
            out.extend(checks[a].finish(accounts[a], holds[a]))
        await self._note_holds(holds)
        return out

    def _archived(self, check: AccountCheck, mark: Fields) -> None:
        """Feed the account's archived calls and history, up to what was marked archived."""
        if self.archive is None:
            check.resume(mark)
            return
        for stream, feed in (("calls", check.call), ("history", check.entry)):
            want, last = mark.get(stream, ""), ""
            if not want:
                continue
            for entry_id, f in archive.read(self.archive, check.account, stream):
                if id_key(entry_id) > id_key(want):
                    break  # written again after a crash: Redis still has it
                feed(entry_id, f)
                last = entry_id
            if last != want:
                check.found.append(Mismatch(
                    check.account, "archive", f"{stream} archived up to {want} but the files "
                    f"under {self.archive} end at {last or 'nothing'}"))
                if stream == "history":
                    check.resume(mark)

    async def _records(self, pairs: list[tuple[str, str]]) -> list[str]:
        """Why each (account, hold) is not a live call's ('' where it is)."""
        refs = [hold[len(CALL_HOLD):] for _, hold in pairs]
        replies = await self._pipe(
            ("HMGET", callrecord.record_key(self.prefix, ref), "account", "state")
            for ref in refs)
        return [hold_problem(a, hold, rec) for (a, hold), rec in zip(pairs, replies,
                                                                       strict=True)]

    async def _note_holds(self, holds: dict[str, dict[str, int]]) -> None:
        pairs = [(a, h) for a, hs in holds.items() for h in hs]
        if not pairs:
            return
        now = time.monotonic()
        for pair, why in zip(pairs, await self._records(pairs), strict=True):
            if why:
                self._suspects.setdefault(pair, now)

    async def _recheck(self) -> list[Mismatch]:
        """The holds found without a live call, looked at again once ``grace`` has passed
        since the last was found: those still there and still without one are reported."""
        if not self._suspects:
            return []
        wait = self.grace - (time.monotonic() - max(self._suspects.values()))
        if wait > 0:
            await asyncio.sleep(wait)
        pairs = list(self._suspects)
        self._suspects.clear()
        still = await self._pipe(
            ("HEXISTS", self.ledger.keys(a)[1], hold) for a, hold in pairs)
        pairs = [p for p, there in zip(pairs, still, strict=True) if there]
        if not pairs:
            return []
        return [Mismatch(a, "hold", f"hold {hold} without a live call: {why}")
                for (a, hold), why in zip(pairs, await self._records(pairs), strict=True)
                if why]
