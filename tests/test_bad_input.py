"""Bad input at the CLI: one clear line on stderr, a non-zero exit, nothing changed.

Each case was accepted (or gave a traceback) before; the good input next to it still works.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from prepaid.inputs import check_email
from prepaid.ratedeck import parse_csv
from shell.cli import main
from tests.conftest import Run

HEADER = "prefix,name,price_per_minute,connect_fee,initial_increment,increment\n"
DECK = HEADER + "353,Ireland,0.0123,0,60,60\n"


def refused(r: Result, *words: str) -> None:
    """Exit non-zero, nothing on stdout, one line on stderr naming the problem."""
    assert r.exit_code != 0, r.output
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for word in words:
        assert word in lines[0], lines[0]


def accounts(run: Run) -> list[str]:
    return [a["id"] for a in json.loads(run("account", "list", "--json").output)]


def test_an_account_id_with_a_trailing_newline_is_refused(run: Run) -> None:
    refused(run("account", "create", "2001\n"), "account id")
    refused(run("topup", "2001\n", "5"), "account id")
    assert accounts(run) == []
    assert run("account", "create", "2001").exit_code == 0


@pytest.mark.parametrize("email", ["a@b.org\nBcc: x@y", "a@b c", "a@b.org\n", "a@b.org,c@d.org",
                                   "<a@b.org>", "nobody"])
def test_an_address_that_is_not_one_address_is_refused_everywhere(run: Run, email: str,
                                                                  tmp_path: Path) -> None:
    refused(run("account", "create", "2001", "--email", email), "--email")
    assert accounts(run) == []
    assert run("account", "create", "2001", "--email", "ann@example.org").exit_code == 0
    refused(run("policy", "2001", "--email", email), "--email")
    assert json.loads(run("account", "show", "2001", "--json").output)["email"] == (
        "ann@example.org")
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[smtp]\nfrom = {json.dumps(email)}\n')
    r = CliRunner().invoke(main, ["--config", str(bad), "balance", "2001"])
    refused(r, "[smtp] from")


def test_good_addresses_pass() -> None:
    for email in ("ann@example.org", "first.last+tag@mail.example.co.uk", "a_b-c@x1.io"):
        assert check_email(email) == email


def test_topup_with_a_bad_stored_address_credits_once_and_exits_zero(run: Run,
                                                                     redis_url: str) -> None:
    # An address stored before it was checked (or written by hand into Redis): the credit
    # stands, the receipt is reported as not queued, and the command does not fail, so the
    # admin does not retry with a new reference.
    import redis
    assert run("account", "create", "2001").exit_code == 0
    r = redis.Redis.from_url(redis_url)
    r.hset("prepaid:{acct:2001}", "email", "a@b.org\nBcc: x@y")
    r.close()
    out = run("topup", "2001", "5", "--reference", "inv-9")
    assert out.exit_code == 0, out.output
    assert "credited EUR 5.00" in out.stdout and "not queued" in out.stderr
    assert run("balance", "2001").stdout.strip() == "2001: EUR 5.00"


@pytest.mark.parametrize("reference", ["", "  ", "4111 1111 1111 1111", "4111-1111-1111-1111",
                                       "inv\n2", "x" * 10_000, "inv\x00"])
def test_a_bad_reference_is_refused_and_nothing_is_credited(run: Run, reference: str) -> None:
    assert run("account", "create", "2001").exit_code == 0
    refused(run("topup", "2001", "5", "--reference", reference), "--reference")
    assert run("balance", "2001").stdout.strip() == "2001: EUR 0.00"
    assert run("topup", "2001", "5", "--reference", "INV-2026/0042").exit_code == 0


def test_topup_with_a_used_reference_shows_todays_balance(run: Run) -> None:
    assert run("account", "create", "2001").exit_code == 0
    assert run("topup", "2001", "5", "--reference", "inv-1").exit_code == 0
    assert run("topup", "2001", "7", "--reference", "inv-2").exit_code == 0
    again = run("topup", "2001", "5", "--reference", "inv-1")
    assert again.exit_code == 0
    assert "already credited" in again.stdout and "balance now EUR 12.00" in again.stdout
    data = json.loads(run("topup", "2001", "5", "--reference", "inv-1", "--json").stdout)
    assert data["duplicate"] is True and data["balance"] == "12.00"


@pytest.mark.parametrize("currency", ["XXX", "EUO", "USD", "eur\n"])
def test_an_unknown_currency_or_not_the_decks_is_refused(run: Run, currency: str) -> None:
    refused(run("account", "create", "2001", "--currency", currency), "currency")
    assert accounts(run) == []
    assert run("account", "create", "2001", "--currency", "eur").exit_code == 0


@pytest.mark.parametrize(("row", "words"), [
    ("353,Ireland,0.01,0,60,²", ["increment"]),
    ("353,Ireland,0.01,0,١٢,60", ["initial_increment"]),
    ("353,Ire\x00land,0.01,0,60,60", ["name", "control character"]),
    ("353,Ireland,0.01,0,60\n", ["expected"]),
    ("35٣,Ireland,0.01,0,60,60", ["prefix"]),
    ("353,Ireland,٠.01,0,60,60", ["price_per_minute"]),
])
def test_bad_deck_values_name_the_line_and_change_nothing(run: Run, tmp_path: Path, row: str,
                                                          words: list[str]) -> None:
    good = tmp_path / "good.csv"
    good.write_text(DECK)
    assert run("rates", "import", str(good)).exit_code == 0
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "44,United Kingdom,0.02,0,1,1\n" + row + "\n", encoding="utf-8")
    refused(run("rates", "import", str(bad)), f"{bad}:3", *words)
    assert "Ireland" in run("rates", "lookup", "+353 1 234").stdout


def test_a_duplicated_header_column_is_named(run: Run, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("prefix,name,name,price_per_minute,connect_fee,initial_increment,increment\n"
                   "353,Ireland,Ireland,0.01,0,60,60\n")
    refused(run("rates", "import", str(bad)), f"{bad}:1", "name", "more than once")


def test_a_free_destination_imports_and_costs_nothing() -> None:
    deck = parse_csv(HEADER + "800,Freephone,0,0,60,60\n")
    assert deck.match("800123").per_minute == 0  # type: ignore[union-attr]


def test_a_stripe_token_is_refused_while_the_gateway_is_the_sandbox(run: Run) -> None:
    assert run("account", "create", "2001").exit_code == 0
    r = run("card", "set", "2001", "--token", "cus_123/pm_456", "--brand", "visa",
            "--last4", "4242", "--exp", "12/39")
    refused(r, "sandbox")
    assert json.loads(run("account", "show", "2001", "--json").output)["card"] is None
    assert run("card", "set", "2001", "--token", "tok_ok", "--brand", "visa", "--last4", "4242",
               "--exp", "12/39").exit_code == 0
