"""Self-service PINs against a real Redis: set by the admin's CLI, checked with lock-out."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from prepaid import pins
from prepaid.ledger import Ledger
from prepaid.pins import PinCheck
from shell.cli import main


def _pin(conf: Path, *args: str, stdin: str = "") -> Result:
    return CliRunner().invoke(main, ["--config", str(conf), "account", "pin", *args],
                              input=stdin, catch_exceptions=False)


@pytest.fixture
def conf(redis_url: str, tmp_path: Path) -> Path:
    path = tmp_path / "prepaid.toml"
    path.write_text(f'[redis]\nurl = "{redis_url}"\n[billing]\ncurrency = "EUR"\n')
    return path


async def test_admin_sets_a_pin_that_is_stored_hashed_and_checked(ledger: Ledger,
                                                                    conf: Path) -> None:
    await ledger.create_account("2001", currency="EUR")
    r = await asyncio.to_thread(_pin, conf, "2001", stdin="4711\n")
    assert r.exit_code == 0 and "PIN set" in r.output and "4711" not in r.output
    raw = await ledger.redis.hget(ledger.account_key("2001"), "pin")
    stored = raw.decode() if isinstance(raw, bytes) else str(raw)
    assert stored.startswith("scrypt$") and "4711" not in stored
    assert await pins.verify_pin(ledger, "2001", "4711") is PinCheck.OK
    assert await pins.verify_pin(ledger, "2001", "4712") is PinCheck.WRONG
    shown = (await asyncio.to_thread(CliRunner().invoke, main, [
        "--config", str(conf), "account", "show", "2001", "--json"])).output
    assert "scrypt" not in shown and "4711" not in shown


async def test_five_wrong_pins_lock_self_service_until_the_admin_sets_it_again(
        ledger: Ledger) -> None:
    await ledger.create_account("2002", currency="EUR")
    await pins.set_pin(ledger, "2002", "123456")
    results = [await pins.verify_pin(ledger, "2002", "000000")
               for _ in range(pins.MAX_FAILURES)]
    assert results == [PinCheck.WRONG] * pins.MAX_FAILURES
    assert await pins.verify_pin(ledger, "2002", "123456") is PinCheck.LOCKED
    ttl = await ledger.redis.ttl(f"{ledger.account_key('2002')}:pin-fails")
    assert 0 < ttl <= pins.LOCK_SECONDS
    await pins.set_pin(ledger, "2002", "123456")
    assert await pins.verify_pin(ledger, "2002", "123456") is PinCheck.OK


async def test_a_right_pin_clears_the_failures_before_it(ledger: Ledger) -> None:
    await ledger.create_account("2003", currency="EUR")
    await pins.set_pin(ledger, "2003", "2468")
    for _ in range(pins.MAX_FAILURES - 1):
        assert await pins.verify_pin(ledger, "2003", "1111") is PinCheck.WRONG
    assert await pins.verify_pin(ledger, "2003", "2468") is PinCheck.OK
    assert await pins.verify_pin(ledger, "2003", "1111") is PinCheck.WRONG
    assert await pins.verify_pin(ledger, "2003", "2468") is PinCheck.OK


async def test_unknown_accounts_and_accounts_without_a_pin_are_counted_too(
        ledger: Ledger) -> None:
    await ledger.create_account("2004", currency="EUR")
    assert await pins.verify_pin(ledger, "2004", "1234") is PinCheck.NO_PIN
    for _ in range(pins.MAX_FAILURES):
        await pins.verify_pin(ledger, "9999", "1234")
    assert await pins.verify_pin(ledger, "9999", "1234") is PinCheck.LOCKED


@pytest.mark.parametrize("bad", ["123", "123456789", "12a4", "١٢٣٤", "12 34", ""])
async def test_a_bad_pin_is_one_clear_line_and_changes_nothing(ledger: Ledger, conf: Path,
                                                               bad: str) -> None:
    await ledger.create_account("2005", currency="EUR")
    r = await asyncio.to_thread(_pin, conf, "2005", stdin=bad + "\n")
    assert r.exit_code != 0
    assert r.output.strip().splitlines() == ["prepaid: error: PIN must be 4 to 8 digits 0-9"]
    assert not await ledger.redis.hget(ledger.account_key("2005"), "pin")


async def test_clear_removes_the_pin_and_unknown_accounts_are_refused(ledger: Ledger,
                                                                      conf: Path) -> None:
    await ledger.create_account("2006", currency="EUR")
    await pins.set_pin(ledger, "2006", "8642")
    assert (await asyncio.to_thread(_pin, conf, "2006", "--clear")).exit_code == 0
    assert await pins.verify_pin(ledger, "2006", "8642") is PinCheck.NO_PIN
    r = await asyncio.to_thread(_pin, conf, "2099", stdin="1234\n")
    assert r.exit_code != 0 and "2099" in r.output and "does not exist" in r.output
