"""Checks of the free text an admin types: e-mail addresses, payment references, names.

Each check raises :class:`InputError` naming the field, or returns the cleaned value.  All
patterns use ``fullmatch`` and ASCII classes: ``$`` would accept a trailing newline and
``str.isdigit`` accepts ``²`` and Arabic-Indic digits.
"""

from __future__ import annotations

import re

from prepaid.errors import InputError

MAX_REFERENCE = 128
MAX_EMAIL = 254  # RFC 5321's path limit
# One address: no whitespace, control characters or the separators a mail header splits on.
_EMAIL_RE = re.compile(r"[^@\s,;<>\"\\()\[\]\x00-\x1f\x7f]{1,64}"
                       r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*", re.ASCII)
_REFERENCE_RE = re.compile(r"[A-Za-z0-9_.:/#+@-]+(?: [A-Za-z0-9_.:/#+@-]+)*", re.ASCII)
_DIGIT_RUN_RE = re.compile(r"[0-9][0-9 -]{11,}[0-9]", re.ASCII)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
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


def check_email(email: str, what: str = "--email") -> str:
    """One plain address (``name@example.org``), or '' for none."""
    if email == "":
        return email
    if len(email) > MAX_EMAIL or not _EMAIL_RE.fullmatch(email):
        raise InputError(f"{what} {email[:80]!r} is not an e-mail address (one, like "
                         "name@example.org)")
    return email


def check_reference(reference: str, what: str = "--reference") -> str:
    """A payment reference: printable, one line, short, and never a card number."""
    if not reference.strip():
        raise InputError(f"{what} is empty; give the payment's reference or leave the "
                         "option out for a generated one")
    if len(reference) > MAX_REFERENCE:
        raise InputError(f"{what} is {len(reference)} characters long; at most "
                         f"{MAX_REFERENCE} allowed")
    if looks_like_card_number(reference):
        raise InputError(f"{what} looks like a card number; never store card numbers")
    if not _REFERENCE_RE.fullmatch(reference):
        raise InputError(f"{what} {reference!r} may hold only letters, digits, single spaces "
                         "and _.:/#+@-")
    return reference


def check_text(value: str, what: str, *, limit: int = 200) -> str:
    """A one-line printable label (a rate's name): no control characters, not too long."""
    if _CONTROL_RE.search(value):
        raise InputError(f"{what} {value[:80]!r} holds a control character")
    if len(value) > limit:
        raise InputError(f"{what} is {len(value)} characters long; at most {limit} allowed")
    return value
