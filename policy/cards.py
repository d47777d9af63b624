"""Stored-card validation: a card is a provider token plus brand, last four digits and expiry.

The project never sees or stores a card number.  Anything that looks like one (13-19
digits passing the Luhn check, spaces and dashes ignored) is refused in every field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from prepaid.errors import InputError
from prepaid.inputs import looks_like_card_number, luhn_ok

__all__ = ["Card", "looks_like_card_number", "luhn_ok", "validate_card"]

BRANDS = ("visa", "mastercard", "amex", "discover", "diners", "jcb", "unionpay", "maestro",
          "cartes_bancaires", "other")
_TOKEN_RE = re.compile(r"[A-Za-z0-9_./:-]{3,200}")  # fullmatch: "$" allows a newline
_EXP_RE = re.compile(r"(0[1-9]|1[0-2])/([0-9]{2}|[0-9]{4})")


@dataclass(frozen=True, slots=True)
class Card:
    token: str
    brand: str
    last4: str
    exp: str  # MM/YY

    @property
    def label(self) -> str:
        return f"{self.brand} ending {self.last4}"


def parse_expiry(exp: str, what: str = "card expiry") -> tuple[int, int]:
    m = _EXP_RE.fullmatch(exp.strip())
    if not m:
        raise InputError(f"{what} {exp!r} must be MM/YY like 12/29")
    month, year = int(m.group(1)), int(m.group(2))
    return month, year if year >= 100 else 2000 + year


def expired(exp: str, today: date) -> bool:
    month, year = parse_expiry(exp)
    return (year, month) < (today.year, today.month)


def validate_card(token: str, brand: str, last4: str, exp: str, today: date) -> Card:
    """Check every field; raise InputError naming the field that is wrong."""
    for name, value in (("token", token), ("brand", brand), ("last4", last4), ("exp", exp)):
        if looks_like_card_number(value):
            raise InputError(f"card {name} looks like a full card number; store only the "
                             "payment provider's token, the brand and the last four digits")
    token = token.strip()
    if not _TOKEN_RE.fullmatch(token):
        raise InputError(f"card token {token!r} must be 3-200 letters, digits or _./:- "
                         "(a payment provider token such as cus_123/pm_456)")
    brand = brand.strip().lower()
    if brand not in BRANDS:
        raise InputError(f"card brand {brand!r} must be one of {', '.join(BRANDS)}")
    last4 = last4.strip()
    if not re.fullmatch(r"[0-9]{4}", last4):
        raise InputError(f"card last4 {last4!r} must be exactly four digits")
    month, year = parse_expiry(exp)
    if (year, month) < (today.year, today.month):
        raise InputError(f"card expiry {exp!r} is in the past")
    return Card(token, brand, last4, f"{month:02d}/{year % 100:02d}")
