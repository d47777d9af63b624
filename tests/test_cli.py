"""The prepaid CLI against a real Redis, as an admin uses it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from prepaid.health import beat
from prepaid.redis_client import connect
from shell.cli import main
from testbed.servers import free_port
from tests.conftest import Run

DECK = """prefix,name,price_per_minute,connect_fee,initial_increment,increment
353,Ireland,0.0123,0,60,60
44,United Kingdom,0.02,0.05,1,1
"""


def test_account_topup_balance_history(run: Run) -> None:
    assert run("account", "create", "1001", "--email", "a@example.org").exit_code == 0
    r = run("topup", "1001", "12.50", "--reference", "inv-1")
    assert r.exit_code == 0 and "balance EUR 12.50" in r.output
    again = run("topup", "1001", "12.50", "--reference", "inv-1")
    assert again.exit_code == 0 and "already credited" in again.output
    assert run("balance", "1001").output.strip() == "1001: EUR 12.50"
    data = json.loads(run("balance", "1001", "--json").output)
    assert data == {"account": "1001", "currency": "EUR", "balance": "12.50", "held": "0.00",
                    "available": "12.50"}
    hist = json.loads(run("history", "1001", "--json").output)
    assert [(h["kind"], h["amount"], h["reference"]) for h in hist] == [
        ("credit", "12.50", "inv-1"), ("open", "0.00", "account created")]
    shown = json.loads(run("account", "show", "1001", "--json").output)
    assert shown["email"] == "a@example.org" and shown["status"] == "active"


def test_suspend_and_resume(run: Run) -> None:
    run("account", "create", "7")
    assert "is suspended" in run("account", "suspend", "7").output
    assert json.loads(run("account", "list", "--json").output)[0]["status"] == "suspended"
    assert "is active" in run("account", "resume", "7").output


@pytest.mark.parametrize(("args", "message"), [
    (("topup", "1001", "-5"), "amount '-5' is negative"),
    (("topup", "1001", "0"), "amount '0' is zero"),
    (("topup", "1001", "ten"), "amount 'ten' is not a number"),
    (("topup", "1001", "1.005"), "amount '1.005' has 3 decimals; at most 2 allowed"),
    (("topup", "nobody", "5"), "account 'nobody' does not exist"),
    (("account", "create", "1001"), "account '1001' already exists"),
    (("account", "create", "bad id"), "account id 'bad id' must be"),
    (("balance", "nobody"), "account 'nobody' does not exist"),
])
def test_bad_input_is_one_clear_line_and_changes_nothing(run: Run, args: tuple[str, ...],
                                                          message: str) -> None:
    run("account", "create", "1001")
    run("topup", "1001", "5", "--reference", "seed")
    r = run(*args)
    assert r.exit_code == 1
    assert r.output.startswith("prepaid: error: ")
    assert message in r.output and len(r.output.strip().splitlines()) == 1
    assert run("balance", "1001").output.strip() == "1001: EUR 5.00"
    assert len(json.loads(run("history", "1001", "--json").output)) == 2


def test_rates_import_and_lookup(run: Run, tmp_path: Path) -> None:
    deck = tmp_path / "rates.csv"
    deck.write_text(DECK)
    r = run("rates", "import", str(deck))
    assert r.exit_code == 0 and "imported 2 rates" in r.output
    data = json.loads(run("rates", "lookup", "+44 20 7946 0000", "--json").output)
    assert data["rate"]["name"] == "United Kingdom"
    assert [(c["seconds"], c["billed_seconds"], c["cost"]) for c in data["costs"]] == [
        (1, 1, "0.050334"), (30, 30, "0.06"), (60, 60, "0.07"), (61, 61, "0.070334"),
        (3600, 3600, "1.25")]
    text = run("rates", "lookup", "0035312345").output
    assert "prefix 353 Ireland" in text and "EUR 0.0246" in text  # 61 s on 60/60


def test_bad_rate_deck_imports_nothing(run: Run, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    good.write_text(DECK)
    bad.write_text(DECK + "33,France,abc,0,60,60\n")
    run("rates", "import", str(good))
    r = run("rates", "import", str(bad))
    assert r.exit_code == 1
    assert f"{bad}:4: price_per_minute 'abc' is not a number" in r.output
    assert run("rates", "lookup", "33123").exit_code == 1  # France never landed
    assert run("rates", "lookup", "44123").exit_code == 0


def test_unreachable_redis_names_the_url(tmp_path: Path) -> None:
    conf = tmp_path / "p.toml"
    conf.write_text('[redis]\nurl = "redis://:secret@127.0.0.1:1/0"\n')
    conf.chmod(0o600)
    r = CliRunner().invoke(main, ["--config", str(conf), "balance", "1001"])
    assert r.exit_code == 1
    assert "cannot reach Redis at redis://:***@127.0.0.1:1/0" in r.output
    assert "secret" not in r.output


def test_bad_config_names_key_and_file(tmp_path: Path) -> None:
    conf = tmp_path / "p.toml"
    conf.write_text('[redis]\nurll = "x"\n')
    r = CliRunner().invoke(main, ["--config", str(conf), "balance", "1001"])
    assert r.exit_code == 1 and f"{conf}: unknown key [redis] urll" in r.output


def _status(conf: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(conf), "status", *args],
                              catch_exceptions=False)


def test_status_shows_each_dependency_and_exits_0_when_calls_can_be_billed(
        redis_url: str, tmp_path: Path) -> None:
    conf = tmp_path / "p.toml"
    conf.write_text(f'[redis]\nurl = "{redis_url}"\n[ami]\nsystem_name = "pbx-a"\n'
                    f'[smtp]\nport = {free_port()}\n')

    async def beats(*states: tuple[str, str, int]) -> None:
        client = connect(redis_url)
        for name, state, backlog in states:
            await beat(client, "prepaid", name, state=state, backlog=backlog)
        await client.aclose()

    r = _status(conf)
    assert r.exit_code == 1  # no heartbeat from this server's listener
    assert "metering pbx-a (this server)" in r.output and "missing" in r.output

    asyncio.run(beats(("pbx-a", "up", 2), ("pbx-b", "behind", 15_000)))
    r = _status(conf, "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert got["ok"] is True and got["redis"]["state"] == "up"
    meters = {m["system_name"]: m for m in got["metering"]}
    assert set(meters) == {"pbx-a", "pbx-b"}
    assert (meters["pbx-a"]["state"], meters["pbx-a"]["backlog"], meters["pbx-a"]["ok"],
            meters["pbx-a"]["this_server"]) == ("up", 2, True, True)
    assert 0 <= meters["pbx-a"]["age_seconds"] < 5
    assert (meters["pbx-b"]["state"], meters["pbx-b"]["ok"]) == ("behind", False)
    assert got["smtp"]["state"] == "down"  # nothing listens on that port
    assert got["gateway"]["state"] == "sandbox"

    asyncio.run(beats(("pbx-a", "down", 0)))
    r = _status(conf)
    assert r.exit_code == 1
    assert "new calls refused (ERROR NO_METERING)" in r.output


def test_status_with_redis_unreachable_says_so_without_the_password(tmp_path: Path) -> None:
    conf = tmp_path / "p.toml"
    conf.write_text('[redis]\nurl = "redis://:secret@127.0.0.1:1/0"\ntimeout = 0.5\n')
    conf.chmod(0o600)
    r = _status(conf, "--json")
    assert r.exit_code == 1
    got = json.loads(r.output)
    assert got["ok"] is False and got["redis"]["state"] == "down"
    assert got["redis"]["detail"].startswith("redis://:***@127.0.0.1:1/0: ")
    assert "secret" not in r.output
