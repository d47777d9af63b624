"""Pure policy decisions: no Redis, no SMTP, no clock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from policy.decide import State, after_decline, day_of, decide, parse_event, retry_delay
from prepaid.config import parse
from prepaid.errors import InputError

EUR = 1_000_000
CAPS = parse({"policy": {"daily_topups": 2, "daily_topup_amount": "50", "max_topup": "40",
                         "max_declines": 3, "decline_backoff_seconds": 600}}).policy
NOW = 1_700_000_000.0
BASE = State(currency="EUR", email="a@example.org", status="active", balance=4 * EUR,
             threshold=5 * EUR, action="topup", policy_enabled=True, topup_amount=20 * EUR,
             has_card=True)


def test_topup_below_threshold_with_card() -> None:
    d = decide(BASE, CAPS, NOW)
    assert (d.kind, d.amount) == ("topup", 20 * EUR)


def test_email_action_warns_and_none_or_off_ignores() -> None:
    assert decide(replace(BASE, action="email"), CAPS, NOW).kind == "warn"
    assert decide(replace(BASE, action="none"), CAPS, NOW).kind == "ignore"
    assert decide(replace(BASE, policy_enabled=False), CAPS, NOW).kind == "ignore"
    assert decide(replace(BASE, action="email", email=""), CAPS, NOW).kind == "ignore"


def test_balance_back_above_threshold_is_ignored() -> None:
    d = decide(replace(BASE, balance=5 * EUR), CAPS, NOW)
    assert d.kind == "ignore" and "back at or above" in d.reason


@pytest.mark.parametrize(("change", "words"), [
    ({"has_card": False}, "no card is stored"),
    ({"topup_amount": 0}, "no automatic top-up amount"),
    ({"topup_amount": 41 * EUR}, "above the maximum of EUR 40.00"),
    ({"decline_until": NOW + 1}, "declined recently"),
    ({"topups_today": 2}, "daily limit of 2 automatic top-ups"),
    ({"amount_today": 31 * EUR}, "limit of EUR 50.00 would be exceeded"),
])
def test_refusals_name_the_reason(change: dict[str, object], words: str) -> None:
    d = decide(replace(BASE, **change), CAPS, NOW)  # type: ignore[arg-type]
    assert d.kind == "refuse" and words in d.reason


def test_daily_amount_cap_allows_exactly_the_limit() -> None:
    assert decide(replace(BASE, amount_today=30 * EUR), CAPS, NOW).kind == "topup"


def test_backoff_ends_at_decline_until() -> None:
    assert decide(replace(BASE, decline_until=NOW), CAPS, NOW).kind == "topup"


def test_a_started_charge_is_finished_even_if_the_settings_changed() -> None:
    d = decide(replace(BASE, action="none", balance=50 * EUR, started_amount=7 * EUR), CAPS, NOW)
    assert (d.kind, d.amount) == ("topup", 7 * EUR)


def test_after_decline_backs_off_and_switches_at_the_limit() -> None:
    first = after_decline(0, CAPS, NOW)
    assert (first.declines, first.decline_until, first.switch_to_email) == (1, NOW + 600, False)
    assert after_decline(2, CAPS, NOW).switch_to_email


def test_parse_event_names_the_bad_field() -> None:
    good = {"account": "a", "crossing": "1-0", "action": "topup", "balance": "4",
            "threshold": "5", "topup_amount": "20"}
    assert parse_event("9-0", good).topup_amount == 20
    with pytest.raises(InputError, match=r"outbox entry 9-0: field 'balance' = 'x'"):
        parse_event("9-0", {**good, "balance": "x"})
    with pytest.raises(InputError, match="field 'account' is missing"):
        parse_event("9-0", {k: v for k, v in good.items() if k != "account"})


def test_day_and_backoff_helpers() -> None:
    assert day_of(0) == "19700101"
    assert [retry_delay(n, cap=5) for n in range(5)] == [0, 1, 2, 4, 5]
