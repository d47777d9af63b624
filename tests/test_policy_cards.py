"""Card validation: never a card number, sane last four digits and expiry."""

from __future__ import annotations

from datetime import date

import pytest

from policy.cards import looks_like_card_number, luhn_ok, validate_card
from prepaid.errors import InputError

TODAY = date(2026, 5, 15)


def test_a_good_card_is_normalised() -> None:
    card = validate_card("cus_123/pm_456", "Visa", "4242", "12/2029", TODAY)
    assert (card.token, card.brand, card.last4, card.exp) == ("cus_123/pm_456", "visa", "4242",
                                                              "12/29")


def test_luhn() -> None:
    assert luhn_ok("4242424242424242") and not luhn_ok("4242424242424241")


@pytest.mark.parametrize("field", ["token", "brand", "last4", "exp"])
@pytest.mark.parametrize("number", ["4242424242424242", "4242 4242 4242 4242",
                                    "5555-5555-5555-4444", "378282246310005"])
def test_a_full_card_number_is_refused_in_any_field(field: str, number: str) -> None:
    args = {"token": "tok_ok", "brand": "visa", "last4": "4242", "exp": "12/29"}
    args[field] = number if field != "token" else f"pm_{number}"
    with pytest.raises(InputError, match=f"card {field} looks like a full card number"):
        validate_card(args["token"], args["brand"], args["last4"], args["exp"], TODAY)


def test_digits_that_fail_luhn_are_not_a_card_number() -> None:
    assert not looks_like_card_number("4242424242424241")
    assert not looks_like_card_number("1234")


@pytest.mark.parametrize(("args", "message"), [
    (("tok ok", "visa", "4242", "12/29"), "card token 'tok ok' must be"),
    (("tok_ok", "bitcoin", "4242", "12/29"), "card brand 'bitcoin' must be one of"),
    (("tok_ok", "visa", "424", "12/29"), "card last4 '424' must be exactly four digits"),
    (("tok_ok", "visa", "42a2", "12/29"), "card last4 '42a2'"),
    (("tok_ok", "visa", "4242", "13/29"), "card expiry '13/29' must be MM/YY"),
    (("tok_ok", "visa", "4242", "04/26"), "card expiry '04/26' is in the past"),
])
def test_bad_fields_are_refused_with_their_name(args: tuple[str, str, str, str],
                                                message: str) -> None:
    with pytest.raises(InputError, match=message):
        validate_card(*args, TODAY)


def test_the_current_month_is_still_valid() -> None:
    assert validate_card("tok_ok", "visa", "4242", "05/26", TODAY).exp == "05/26"
