"""Reading history and metered calls for exports and reports, one page at a time: an
account's balance changes (``{acct:ID}:history``) and settled calls (``{acct:ID}:calls``,
written by the metering listener), within a :class:`Period`, for one account or for all
(the account index in pages, each account's entries oldest first)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prepaid import archive, keys, pages
from prepaid.archive import id_key
from prepaid.errors import StoreUnavailable
from prepaid.ledger import Ledger
from prepaid.money import format_amount
from prepaid.period import Period
from prepaid.redis_client import REDIS_ERRORS, text

INDEX_PAGE = 500
EVER = Period()


def _time(entry_id: str) -> float:
    return int(entry_id.split("-", 1)[0]) / 1000


def _float(value: str) -> float | None:
    return float(value) if value else None


@dataclass(frozen=True, slots=True)
class HistoryRow:
    id: str
    account: str
    kind: str  # the ledger op: open, credit, debit, reserve, settle, release ...
    amount: int  # signed micro-units
    balance: int
    held: int
    ref: str
    key: str  # the idempotency key: its head tells a top-up's kind (topup:, autotopup: ...)
    operator: str = ""  # a correction's (adjust, refund, reverse): who made it and why
    reason: str = ""

    @property
    def time(self) -> float:
        return _time(self.id)

    @classmethod
    def from_entry(cls, account: str, entry_id: str, f: dict[str, str]) -> HistoryRow:
        return cls(entry_id, account, f.get("kind", ""), int(f.get("amount") or 0),
                   int(f.get("balance") or 0), int(f.get("held") or 0), f.get("ref", ""),
                   f.get("key", ""), f.get("operator", ""), f.get("reason", ""))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "time": self.time, "account": self.account, "kind": self.kind,
                "amount": format_amount(self.amount), "balance": format_amount(self.balance),
                "held": format_amount(self.held), "reference": self.ref,
                "operator": self.operator, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class CallRow:
    id: str  # when the call was settled and logged
    account: str
    ref: str
    number: str
    prefix: str
    rate: str  # the destination's name in the rate deck
    answered: float | None
    ended: float | None
    duration: int
    billed: int
    cost: int  # micro-units
    cause: str
    source: str
    cutoff: int
    plan: str  # the plan it was rated with, if the meter names one

    @property
    def time(self) -> float:
        return _time(self.id)

    @classmethod
    def from_entry(cls, account: str, entry_id: str, f: dict[str, str]) -> CallRow:
        return cls(entry_id, f.get("account") or account, f.get("ref", ""),
                   f.get("number", ""), f.get("prefix", ""), f.get("rate", ""),
                   _float(f.get("answered", "")), _float(f.get("ended", "")),
                   int(f.get("duration") or 0), int(f.get("billed") or 0),
                   int(f.get("cost") or 0), f.get("cause", ""), f.get("source", ""),
                   int(f.get("cutoff") or 0), f.get("plan", ""))

    def to_json(self) -> dict[str, Any]:
        return {"account": self.account, "ref": self.ref, "number": self.number,
                "prefix": self.prefix, "rate": self.rate, "answered": self.answered,
                "ended": self.ended, "duration": self.duration, "billed": self.billed,
                "cost": format_amount(self.cost), "cause": self.cause, "source": self.source,
                "cutoff": self.cutoff, "plan": self.plan}


async def account_ids(ledger: Ledger) -> AsyncIterator[str]:
    """Every account id, by creation, one page of the index per round trip."""
    start = 0
    while True:
        try:
            ids = await ledger.redis.zrange(ledger.index_key, start, start + INDEX_PAGE - 1)
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"Redis is unavailable reading the accounts: {exc}"
                                   ) from exc
        for account in ids:
            yield text(account)
        if len(ids) < INDEX_PAGE:
            return
        start += INDEX_PAGE


async def _entries(ledger: Ledger, account: str, stream: str, period: Period,
                   newest_first: bool, root: Path | None
                   ) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """The stream's entries in the period: with ``root``, the archived part (up to the
    account's archived mark, from the files) before (or, newest first, after) Redis's."""
    key = keys.account_part(ledger.prefix, account, stream)
    mark = ""
    if root is not None:
        try:
            raw = await ledger.redis.hget(keys.archive_mark(ledger.prefix, account), stream)
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"Redis is unavailable reading {key}: {exc}") from exc
        mark = text(raw) if raw else ""
    start = period.start_id
    if mark and (start == "-" or id_key(start) <= id_key(mark)):
        start = "(" + mark  # Redis holds what came after the mark (and may not yet have
        # trimmed what came before: that is read from the files)
    archived: Iterator[tuple[str, dict[str, str]]] = iter(())
    if mark and root is not None:
        lo = -1 if period.since is None else round(period.since * 1000)
        hi = None if period.until is None else round(period.until * 1000)
        archived = (e for e in (archive.read_reversed if newest_first else archive.read)(
            root, account, stream) if id_key(e[0]) <= id_key(mark)
            and lo <= id_key(e[0])[0] and (hi is None or id_key(e[0])[0] < hi))
    if not newest_first:
        for e in archived:
            yield e
    async for e in pages.entries(ledger.redis, key, start, period.end_id,
                                 newest_first=newest_first):
        yield e
    if newest_first:
        for e in archived:
            yield e


async def history(ledger: Ledger, account: str, period: Period = EVER, *,
                  newest_first: bool = False, archive: Path | None = None
                  ) -> AsyncIterator[HistoryRow]:
    """The account's history in the period; with ``archive`` (the directory of ``prepaid
    archive``) its archived part too."""
    async for entry_id, f in _entries(ledger, account, "history", period, newest_first,
                                      archive):
        yield HistoryRow.from_entry(account, entry_id, f)


async def calls(ledger: Ledger, account: str, period: Period = EVER, *,
                newest_first: bool = False, archive: Path | None = None
                ) -> AsyncIterator[CallRow]:
    async for entry_id, f in _entries(ledger, account, "calls", period, newest_first, archive):
        yield CallRow.from_entry(account, entry_id, f)
