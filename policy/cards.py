"""Stored-card validation: a card is a provider token plus brand, last four digits and expiry.

The project never sees or stores a card number.  Anything that looks like one (13-19
digits passing the Luhn check, spaces and dashes ignored) is refused in every field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from prepaid.errors import InputError

BRANDS = ("visa", "mastercard", "amex", "discover", "diners", "jcb", "unionpay", "maestro",
          "cartes_bancaires", "other")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_./:-]{3,200}$")
_EXP_RE = re.compile(r"^(0[1-9]|1[0-2])/([0-9]{2}|[0-9]{4})$")
_DIGIT_RUN_RE = re.compile(r"[0-9][0-9 -]{11,}[0-9]")


@dataclass(frozen=True, slots=True)
class Card:
    token: str
    brand: str
    last4: str
    exp: str  # MM/YY

    @property
    def label(self) -> str:
        return f"{self.brand} ending {self.last4}"


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def looks_like_card_number(text: str) -> bool:
    """True if ``text`` holds 13-19 digits (spaces/dashes ignored) that pass the Luhn check."""
    for run in _DIGIT_RUN_RE.findall(text):
        digits = re.sub(r"[ -]", "", run)
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            return True
    return False


def parse_expiry(exp: str, what: str = "card expiry") -> tuple[int, int]:
    m = _EXP_RE.match(exp.strip())
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
    if not _TOKEN_RE.match(token):
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
