"""What the pages show, from the account's values: pure functions, no I/O."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prepaid.ledger import Account, Entry
from prepaid.money import format_amount

# Notices after a redirect: the page shows only these fixed texts (nothing from the URL).
NOTICES = {
    "saved": "Your low-balance setting is saved.",
    "card-stored": "Your card is stored. Only its brand, last four digits and expiry are kept "
                   "here.",
    "card-pending": "Your card is being stored; it shows here in a moment.",
    "card-removed": "Your card is removed.",
    "card-removed-topup-off": "Your card is removed, so automatic top-up is off: you get an "
                              "e-mail when the balance is low.",
    "paid": "Thank you: your payment is received and credited.",
    "payment-pending": "Thank you: your payment is being credited; the balance shows it in "
                       "a moment.",
    "cancelled": "Nothing was paid or stored.",
    "requested": "Your request is sent to support; they will contact you.",
    "logged-out": "You are logged out.",
}

ACTION_LABELS = {"none": "Do nothing", "email": "E-mail me",
                 "topup": "Top up automatically from my card"}
KIND_LABELS = {"open": "account opened", "credit": "credit", "debit": "charge",
               "reserve": "held for a call", "settle": "call", "release": "released"}
# The CLI's option names in the shared rules' messages, as this page's fields.
_FIELDS = {"--threshold": "the threshold", "--amount": "the top-up amount",
           "--action topup": "automatic top-up", "--action": "the action",
           "--email": "an e-mail address"}


def web_message(message: str) -> str:
    """An InputError of the shared rules (policy/commands.py) in this page's words."""
    text = message
    for option, label in _FIELDS.items():
        text = text.replace(option, label)
    text = re.sub(r"store one with 'prepaid card set [^']*'", "store one below", text)
    return text[:1].upper() + text[1:]


def stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def money(micros: int, currency: str) -> str:
    return format_amount(micros, currency)


@dataclass(frozen=True, slots=True)
class Page:
    number: int  # from 0
    more: bool  # a next page exists

    @property
    def previous(self) -> int | None:
        return self.number - 1 if self.number > 0 else None

    @property
    def next(self) -> int | None:
        return self.number + 1 if self.more else None


def page_of(rows: Sequence[Any], number: int, size: int) -> tuple[list[Any], Page]:
    """Rows ``number*size ..`` of the newest-first ``rows`` (fetched one past the page)."""
    start = number * size
    return list(rows[start:start + size]), Page(number, len(rows) > start + size)


def page_number(raw: str | None, last: int = 99) -> int:
    if raw is None or not raw.isascii() or not raw.isdigit():
        return 0
    return min(int(raw), last)


def history_rows(entries: Sequence[Entry], currency: str) -> list[dict[str, str]]:
    return [{"time": stamp(e.time), "kind": KIND_LABELS.get(e.kind, e.kind),
             "amount": money(e.amount, currency) if e.amount else "-",
             "balance": money(e.balance, currency), "ref": e.ref} for e in entries]


def call_rows(calls: Sequence[Mapping[str, str]], currency: str) -> list[dict[str, str]]:
    rows = []
    for c in calls:
        start = c.get("answered") or c.get("ended") or ""
        rows.append({"time": stamp(float(start)) if start else "-",
                     "number": c.get("number", ""),
                     "billed": f"{int(c.get('billed') or 0)} s",
                     "cost": money(int(c.get("cost") or 0), currency)})
    return rows


def policy_view(acct: Account) -> dict[str, Any]:
    cur = acct.currency
    action = acct.action if acct.policy_enabled else "none"
    return {"action": action, "label": ACTION_LABELS.get(action, action),
            "threshold": format_amount(acct.threshold) if acct.threshold else "",
            "amount": format_amount(acct.topup_amount) if acct.topup_amount else "",
            "summary": _summary(acct, action, cur)}


def _summary(acct: Account, action: str, cur: str) -> str:
    if action == "none":
        return "Nothing happens when the balance is low."
    below = money(acct.threshold, cur)
    if action == "email":
        return f"When the balance falls below {below}, we e-mail {acct.email or 'you'}."
    return (f"When the balance falls below {below}, we add {money(acct.topup_amount, cur)} "
            "from your card.")


def card_view(acct: Account) -> dict[str, str] | None:
    if not acct.has_card:
        return None
    return {"brand": acct.card_brand.replace("_", " ").title(), "last4": acct.card_last4,
            "exp": acct.card_exp}
