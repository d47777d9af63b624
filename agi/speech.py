"""What the balance IVR says, as a pure list of steps (prompt files and numbers)."""

from __future__ import annotations

from prepaid.money import MICROS_PER_UNIT, currency_decimals

CURRENCY_PROMPTS = {"EUR": "prepaid/currency-eur", "USD": "prepaid/currency-usd",
                    "GBP": "prepaid/currency-gbp"}
GENERIC_CURRENCY = "prepaid/currency-units"

# ("file", "prepaid/x"), ("number", 12) or ("digits", "4242"): "four two four two"
Step = tuple[str, str | int]


def balance_speech(balance: int, currency: str) -> list[Step]:
    """'Your balance is <units> <currency> [and <cents> cents]' (sub-cent digits are cut)."""
    return [("file", "prepaid/your-balance-is"), *amount_speech(balance, currency)]


def amount_speech(amount: int, currency: str) -> list[Step]:
    """'[minus] <units> <currency> [and <cents> cents]' (sub-cent digits are cut)."""
    steps: list[Step] = []
    if amount < 0:
        steps.append(("file", "prepaid/minus"))
    whole, frac = divmod(abs(amount), MICROS_PER_UNIT)
    steps += [("number", whole), ("file", CURRENCY_PROMPTS.get(currency, GENERIC_CURRENCY))]
    if currency_decimals(currency) == 2:
        cents = frac // (MICROS_PER_UNIT // 100)
        if cents:
            steps += [("file", "prepaid/and"), ("number", cents), ("file", "prepaid/cents")]
    return steps
