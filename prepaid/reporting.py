"""What ``prepaid report`` adds up, as pure logic: rows in, totals out (no I/O here).

Calls count by destination (the rate deck's prefix and name), by plan and by account;
credits by kind (from the idempotency key's head: a manual top-up is ``topup:``, an
automatic one ``autotopup:``, a phone one ``ivrtopup:``; corrections, of either sign, by
their own kind: adjust, refund, reverse); and the accounts to look at:
suspended, or below their low-balance threshold. Memory grows with the number of
destinations and accounts, never with the number of calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prepaid.exports import CallRow, HistoryRow
from prepaid.ledger import Account
from prepaid.money import format_amount
from prepaid.ratedeck import DEFAULT_PLAN

# The head of a credit's idempotency key -> the kind of top-up it is.
CREDIT_KINDS = {"topup": "manual", "autotopup": "automatic", "ivrtopup": "phone"}
# Credits that are part of a call's settlement (paid-ahead blocks given back): in the
# calls' cost already, not top-ups.
CALL_CREDITS = ("rfd",)


def minutes(seconds: int) -> str:
    """Billed seconds as minutes, to the hundredth (exact: no float)."""
    hundredths = (seconds * 100 + 30) // 60
    return f"{hundredths // 100}.{hundredths % 100:02d}"


@dataclass
class Tally:
    count: int = 0
    seconds: int = 0
    amount: int = 0  # micro-units

    def add(self, amount: int, seconds: int = 0) -> None:
        self.count += 1
        self.seconds += seconds
        self.amount += amount

    def calls_json(self) -> dict[str, Any]:
        return {"calls": self.count, "billed_seconds": self.seconds,
                "minutes": minutes(self.seconds), "revenue": format_amount(self.amount)}

    def credits_json(self) -> dict[str, Any]:
        return {"count": self.count, "amount": format_amount(self.amount)}


@dataclass(frozen=True, slots=True)
class Watch:
    """An account to look at: suspended, or below its threshold."""

    account: str
    status: str
    balance: int
    threshold: int

    @property
    def why(self) -> str:
        reasons = []
        if self.status != "active":
            reasons.append(self.status)
        if 0 < self.threshold and self.balance < self.threshold:
            reasons.append(f"below threshold {format_amount(self.threshold)}")
        return ", ".join(reasons)

    def to_json(self) -> dict[str, Any]:
        return {"account": self.account, "status": self.status,
                "balance": format_amount(self.balance),
                "threshold": format_amount(self.threshold), "why": self.why}


CORRECTIONS = ("adjust", "refund", "reverse")


def credit_kind(row: HistoryRow) -> str | None:
    """The kind of a history row that credits the account (or corrects it), None for any
    other row."""
    if row.kind in CORRECTIONS and row.amount:
        return row.kind
    if row.amount <= 0:
        return None
    head = row.key.split(":", 1)[0] if ":" in row.key else ""
    if head in CALL_CREDITS:
        return None
    if head in CREDIT_KINDS:
        return CREDIT_KINDS[head]
    return head or row.kind


def plan_of(account: dict[str, str]) -> str:
    """The plan an account's calls are counted under (its ``plan`` field, else default)."""
    return account.get("plan") or DEFAULT_PLAN


@dataclass
class Report:
    total: Tally = field(default_factory=Tally)
    destinations: dict[tuple[str, str], Tally] = field(default_factory=dict)
    plans: dict[str, Tally] = field(default_factory=dict)
    accounts: dict[str, Tally] = field(default_factory=dict)
    credits: dict[str, Tally] = field(default_factory=dict)
    watch: list[Watch] = field(default_factory=list)

    def add_call(self, call: CallRow, plan: str = DEFAULT_PLAN) -> None:
        for tally in (self.destinations.setdefault((call.prefix, call.rate), Tally()),
                      self.plans.setdefault(call.plan or plan, Tally()),
                      self.accounts.setdefault(call.account, Tally()), self.total):
            tally.add(call.cost, call.billed)

    def add_history(self, row: HistoryRow) -> None:
        kind = credit_kind(row)
        if kind is not None:
            self.credits.setdefault(kind, Tally()).add(row.amount)

    def add_account(self, account: Account) -> None:
        note = Watch(account.id, account.status, account.balance, account.threshold)
        if note.why:
            self.watch.append(note)

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": self.total.calls_json(),
            "by_destination": [{"prefix": p, "destination": n, **t.calls_json()}
                               for (p, n), t in _by_revenue(self.destinations)],
            "by_plan": [{"plan": n, **t.calls_json()} for n, t in _by_revenue(self.plans)],
            "by_account": [{"account": n, **t.calls_json()}
                           for n, t in _by_revenue(self.accounts)],
            "topups": [{"kind": n, **t.credits_json()} for n, t in _by_revenue(self.credits)],
            "watch": [w.to_json() for w in self.watch],
        }


def _by_revenue(table: dict[Any, Tally]) -> list[tuple[Any, Tally]]:
    """Largest amount first, then by name, so the order is the same every time."""
    return sorted(table.items(), key=lambda kv: (-kv[1].amount, str(kv[0])))
