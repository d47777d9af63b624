"""Pure decision logic, speech planning and the outage log: no I/O, no sleeping."""

from __future__ import annotations

import logging

import pytest

from agi.decision import (
    Decision,
    Policy,
    Reason,
    Status,
    decide,
    deny,
    dial_limit,
    dialed_number,
    on_failure,
    pick_account,
    warning_limit,
)
from agi.protocol import AgiError, parse_reply, quote
from agi.routes import new_outage_log
from agi.speech import balance_speech
from prepaid.rating import Rate

GERMANY = Rate("49", "Germany", 60_000, 100_000, 60, 60)
POLICY = Policy()


def test_enough_credit_allows_whole_increments() -> None:
    d = decide(status="active", balance=1_000_000, threshold=0, rate=GERMANY,
               available=1_000_000, policy=POLICY)
    # L() of the shipped dialplan: the 3 h cap, the warning 60 s before the 900 s paid end.
    assert d == Decision(Status.ALLOWED, Reason.NONE, 900, "900000:60000",
                         "10800000:9960000", hold=160_000, ring_seconds=60)
    assert d.timeout == 960  # TIMEOUT(absolute) before Dial: 60 s ringing + 900 s paid


def test_one_micro_unit_short_of_the_first_block_is_no_credit() -> None:
    d = decide(status="active", balance=159_999, threshold=0, rate=GERMANY, available=159_999,
               policy=POLICY)
    assert (d.status, d.reason, d.prompt, d.hangup) == (
        Status.DENIED, Reason.NO_CREDIT, "prepaid/balance-too-low", True)


def test_cap_limits_the_call() -> None:
    d = decide(status="active", balance=10**12, threshold=0, rate=GERMANY, available=10**12,
               policy=Policy(max_call_seconds=90))
    assert (d.max_seconds, d.dial_limit) == (90, "90000:60000")


def test_suspended_before_credit() -> None:
    d = decide(status="suspended", balance=0, threshold=0, rate=GERMANY, available=0,
               policy=POLICY)
    assert (d.status, d.reason, d.prompt) == (Status.DENIED, Reason.SUSPENDED,
                                              "prepaid/call-cannot-be-completed")


@pytest.mark.parametrize(("balance", "threshold", "low"), [
    (1_000_000, 5_000_000, True), (5_000_000, 5_000_000, False), (1_000_000, 0, False)])
def test_low_balance_flag(balance: int, threshold: int, low: bool) -> None:
    d = decide(status="active", balance=balance, threshold=threshold, rate=GERMANY,
               available=balance, policy=POLICY)
    assert d.low_balance is low


def test_dial_limit_drops_a_warning_that_could_never_play() -> None:
    assert dial_limit(61, 60_000) == "61000:60000"
    assert dial_limit(60, 60_000) == "60000:0"
    assert dial_limit(30, 0) == "30000:0"


def test_warning_limit_warns_before_the_paid_end_and_never_cuts_short_of_the_cap() -> None:
    # L(x:y) warns at x - y after answer: 840 s, a minute before the 900 s paid end.
    assert warning_limit(900, 10_800, 60_000) == "10800000:9960000"
    # Less paid than the warning: at once (1 ms after answer; y < x or Asterisk drops it).
    assert warning_limit(30, 600, 60_000) == "600000:599999"
    assert warning_limit(60, 600, 60_000) == "600000:599999"
    # Paid up to the cap (a free destination, fail open): a minute before the cap.
    assert warning_limit(600, 600, 60_000) == "600000:60000"
    assert warning_limit(900, 600, 60_000) == "900000:60000"  # never short of the paid time
    assert warning_limit(900, 10_800, 0) == "10800000:0"  # warnings off


def test_failure_is_closed_by_default_and_open_on_request() -> None:
    assert on_failure(POLICY) == deny(Reason.INTERNAL, POLICY)
    assert on_failure(POLICY).status is Status.ERROR
    opened = on_failure(Policy(fail_open=True, max_call_seconds=600))
    assert (opened.status, opened.reason, opened.dial_limit) == (
        Status.ALLOWED, Reason.FAIL_OPEN, "600000:60000")


def test_pick_account_follows_the_configured_order() -> None:
    env = {"agi_accountcode": "acc", "agi_callerid": "1001"}
    sources = ("variable", "accountcode", "callerid")
    assert pick_account(sources, env, "var") == "var"
    assert pick_account(sources, env, None) == "acc"
    assert pick_account(sources, {**env, "agi_accountcode": ""}, "") == "1001"
    assert pick_account(("callerid", "accountcode"), env, "var") == "1001"
    assert pick_account(sources, {"agi_callerid": "unknown"}, None) == ""


def test_dialed_number_prefers_the_argument() -> None:
    assert dialed_number(["0049"], {"agi_extension": "s"}) == "0049"
    assert dialed_number([], {"agi_extension": "0044"}) == "0044"


def test_balance_speech() -> None:
    assert balance_speech(9_504_321, "EUR") == [
        ("file", "prepaid/your-balance-is"), ("number", 9), ("file", "prepaid/currency-eur"),
        ("file", "prepaid/and"), ("number", 50), ("file", "prepaid/cents")]
    assert balance_speech(12_000_000, "USD")[1:] == [("number", 12),
                                                      ("file", "prepaid/currency-usd")]
    assert balance_speech(-1_500_000, "GBP")[1:3] == [("file", "prepaid/minus"), ("number", 1)]
    assert balance_speech(500_000_000, "JPY")[2] == ("file", "prepaid/currency-units")


def test_agi_outage_log_logs_once_then_recovery(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agi")
    outage = new_outage_log()
    outage.success()
    for _ in range(5):
        outage.failure("refused")
    outage.success()
    outage.success()
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.ERROR] + [logging.DEBUG] * 4 + [logging.INFO]
    assert "recovered after 5" in caplog.records[-1].getMessage()


def test_reply_parsing() -> None:
    r = parse_reply("200 result=1 (1700000000.1)")
    assert (r.code, r.result, r.data) == (200, 1, "1700000000.1")
    assert parse_reply("200 result=0 endpos=8000").result == 0
    assert parse_reply("511 Command Not Permitted on a dead channel").code == 511
    with pytest.raises(AgiError, match="not '<code> result"):
        parse_reply("hello")
    assert quote('a"b') == '"a\\"b"'
