"""Exact money: integer micro-units, parsed from and formatted to decimal strings.

Every amount inside the project is an ``int`` of micro-units (1/1,000,000 of a
currency unit).  A rate of 0.0123/min is 12,300 micro-units a minute, so one
second of it is 205 micro-units exactly; the sub-unit is fine enough that the
per-second share of any rate with up to 4 decimals is exact, and rates with 5
or 6 decimals lose at most a micro-unit per call.

The only place where a value is rounded is :func:`div_round_up`, used by
rating to turn "price per minute x billed seconds / 60" into micro-units.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from prepaid.errors import InputError

MICROS_PER_UNIT = 1_000_000
SUBUNIT_DECIMALS = 6

# ISO 4217 minor units for the currencies an admin is likely to bill in; any
# other three-letter code defaults to 2 decimals.
_CURRENCY_DECIMALS = {"JPY": 0, "KRW": 0, "CLP": 0, "ISK": 0, "BHD": 3, "KWD": 3, "JOD": 3,
                      "OMR": 3, "TND": 3}
_SYMBOLS = {"EUR": "€", "USD": "$", "GBP": "£", "JPY": "¥"}
_AMOUNT_RE = re.compile(r"[0-9]+(\.[0-9]+)?")  # fullmatch: "$" would allow a newline
_CURRENCY_RE = re.compile(r"[A-Z]{3}")
# The active ISO 4217 codes (2024), funds and precious metals left out: a typo like XXX or
# EUO is refused rather than billed in.
ISO_4217 = frozenset("""
AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN BWP
BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP
GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR
KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK
MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR
SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS
UAH UGX USD UYU UZS VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG
""".split())


def currency_decimals(currency: str) -> int:
    return _CURRENCY_DECIMALS.get(currency, 2)


def check_currency(currency: str) -> str:
    if not _CURRENCY_RE.fullmatch(currency):
        raise InputError(f"currency {currency!r} is not a three-letter ISO 4217 code like EUR")
    if currency not in ISO_4217:
        raise InputError(f"currency {currency!r} is not a known ISO 4217 code (like EUR, USD)")
    return currency


def parse_amount(text: str, *, decimals: int = SUBUNIT_DECIMALS, what: str = "amount",
                 allow_zero: bool = False) -> int:
    """Parse a positive decimal string into micro-units, refusing more than ``decimals`` places."""
    raw = text.strip()
    if not _AMOUNT_RE.fullmatch(raw):
        if raw.startswith("-"):
            raise InputError(f"{what} {text!r} is negative; give a positive amount like 10.00")
        raise InputError(f"{what} {text!r} is not a number like 10.00")
    try:
        value = Decimal(raw)
    except InvalidOperation as exc:  # pragma: no cover - the regex already guards this
        raise InputError(f"{what} {text!r} is not a number") from exc
    places = len(raw.split(".", 1)[1]) if "." in raw else 0
    if places > decimals:
        raise InputError(f"{what} {text!r} has {places} decimals; at most {decimals} allowed")
    micros = value * MICROS_PER_UNIT
    if micros != micros.to_integral_value():  # pragma: no cover - decimals <= 6
        raise InputError(f"{what} {text!r} is finer than one micro-unit")
    result = int(micros)
    if result == 0 and not allow_zero:
        raise InputError(f"{what} {text!r} is zero; give a positive amount")
    if result > 10**15:
        raise InputError(f"{what} {text!r} is too large")
    return result


def format_amount(micros: int, currency: str | None = None, *, decimals: int | None = None) -> str:
    """Render micro-units as a decimal string with at least the currency's decimals.

    Digits past the currency's decimals are shown only when non-zero, so a balance
    is never silently rounded on screen (``EUR 9.987495``).
    """
    shown = currency_decimals(currency) if decimals is None and currency else (decimals or 2)
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_UNIT)
    frac_text = f"{frac:06d}".rstrip("0")
    if len(frac_text) < shown:
        frac_text = frac_text.ljust(shown, "0")
    text = f"{sign}{whole}" + (f".{frac_text}" if frac_text else "")
    return f"{currency} {text}" if currency else text


def currency_symbol(currency: str) -> str:
    return _SYMBOLS.get(currency, currency)


def div_round_up(numerator: int, denominator: int) -> int:
    """The one rounding rule: a fraction of a micro-unit is charged as a whole one."""
    if denominator <= 0:
        raise ValueError("denominator must be positive")
    return -((-numerator) // denominator)
