"""Reading history and metered calls for exports and reports, one page at a time: an
account's balance changes (``{acct:ID}:history``) and settled calls (``{acct:ID}:calls``,
written by the metering listener), within a :class:`Period`, for one account or for all
(the account index in pages, each account's entries oldest first)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from prepaid import keys, pages
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


async def history(ledger: Ledger, account: str, period: Period = EVER, *,
                  newest_first: bool = False) -> AsyncIterator[HistoryRow]:
    key = keys.account_part(ledger.prefix, account, "history")
    async for entry_id, f in pages.entries(ledger.redis, key, period.start_id, period.end_id,
                                           newest_first=newest_first):
        yield HistoryRow.from_entry(account, entry_id, f)


async def calls(ledger: Ledger, account: str, period: Period = EVER, *,
                newest_first: bool = False) -> AsyncIterator[CallRow]:
    key = keys.account_part(ledger.prefix, account, "calls")
    async for entry_id, f in pages.entries(ledger.redis, key, period.start_id, period.end_id,
                                           newest_first=newest_first):
        yield CallRow.from_entry(account, entry_id, f)
