"""What the balance IVR says, as a pure list of steps (prompt files and numbers)."""

from __future__ import annotations

from prepaid.money import MICROS_PER_UNIT, currency_decimals

CURRENCY_PROMPTS = {"EUR": "prepaid/currency-eur", "USD": "prepaid/currency-usd",
                    "GBP": "prepaid/currency-gbp"}
GENERIC_CURRENCY = "prepaid/currency-units"

Step = tuple[str, str | int]  # ("file", "prepaid/x") or ("number", 12)


def balance_speech(balance: int, currency: str) -> list[Step]:
    """'Your balance is <units> <currency> [and <cents> cents]' (sub-cent digits are cut)."""
    steps: list[Step] = [("file", "prepaid/your-balance-is")]
    if balance < 0:
        steps.append(("file", "prepaid/minus"))
    whole, frac = divmod(abs(balance), MICROS_PER_UNIT)
    steps += [("number", whole), ("file", CURRENCY_PROMPTS.get(currency, GENERIC_CURRENCY))]
    if currency_decimals(currency) == 2:
        cents = frac // (MICROS_PER_UNIT // 100)
        if cents:
            steps += [("file", "prepaid/and"), ("number", cents), ("file", "prepaid/cents")]
    return steps
