"""Plans: a rate deck per customer group, one currency each, against a real Redis; calls
authorized over FastAGI and metered from recorded Asterisk traffic are rated by the
account's plan, and a live call keeps the rate it was authorized with."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agi.server import AgiServer
from ami_listener.meter import Meter, calls_key
from ami_listener.runners import replay
from prepaid.exports import EVER
from prepaid.ratedeck import Normalisation, iter_csv, parse_csv
from prepaid.ratestore import RateStore
from prepaid.rating import Rate, cost
from prepaid.redis_client import connect
from prepaid.store import Store
from shell.reports import build_report
from testbed.agi_peer import DENY_TAIL, GET_CALLER, AgiPeer, agi_env, variable_commands
from testbed.ami_peer import FIXTURES, load
from testbed.replies import entries, fields
from tests.conftest import Run, cli
from tests.test_agi_fastagi import make_settings, start
from tests.test_bad_input import refused
from tests.test_ratestore import big_deck, commands

HEADER = "prefix,name,price_per_minute,connect_fee,initial_increment,increment\n"
DEFAULT = HEADER + "49,Germany,0.06,0.10,60,60\n39,Italy,0.60,0.05,1,1\n"
GOLD = HEADER + "49,Germany gold,0.03,0.10,60,60\n39,Italy gold,0.30,0.05,1,1\n"
NORM = Normalisation()
EUR = 1_000_000


@pytest.fixture
def decks(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, text in {"default": DEFAULT, "gold": GOLD}.items():
        out[name] = tmp_path / f"{name}.csv"
        out[name].write_text(text)
    return out


def ok(r: object) -> dict[str, object]:
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    data: dict[str, object] = json.loads(r.stdout)  # type: ignore[attr-defined]
    return data


# -- the store ---------------------------------------------------------------------------
async def test_each_plan_has_its_own_deck_and_a_lookup_stays_one_hmget(redis_url: str) -> None:
    client = connect(redis_url)
    store, reader = RateStore(client), RateStore(client)
    await store.replace(parse_csv(DEFAULT))
    report = await store.load(iter_csv(io.StringIO(big_deck(30_000, "0.02")), "big.csv"),
                              plan="gold", currency="USD")
    assert (report.plan, report.currency, report.rows) == ("gold", "USD", 30_000)
    assert (await reader.lookup("4930", NORM)).name == "Germany"  # the default deck as before
    quote = await reader.quote("001000012347", NORM, "gold")
    assert (quote.rate.name, quote.rate.per_minute, quote.currency) == ("Dest 1234", 20_000,
                                                                        "USD")
    await client.config_resetstat()
    for n in (1, 2, 29_999):
        assert (await reader.quote(f"001{n:08d}77", NORM, "gold")).rate.name == f"Dest {n}"
    used = await commands(client)
    # A 30,000-row plan costs a lookup what the default's costs: one GET, one HMGET.
    assert used.get("hmget") == 3 and used.get("get") == 3
    assert not {"hgetall", "hscan", "hkeys", "hvals", "hget"} & set(used)
    assert [(p.plan, p.currency, p.rates) for p in await reader.plans()] == [
        ("default", "EUR", 2), ("gold", "USD", 30_000)]
    await client.aclose()


async def test_replacing_one_plans_deck_leaves_the_others(redis_url: str) -> None:
    client = connect(redis_url)
    store = RateStore(client)
    await store.replace(parse_csv(DEFAULT))
    await store.replace(parse_csv(GOLD), plan="gold")
    await store.replace(parse_csv(HEADER + "1,USA gold,0.01,0,60,60\n"), plan="gold")
    assert (await store.lookup("4930", NORM)).name == "Germany"
    assert (await store.lookup("1555", NORM, "gold")).name == "USA gold"
    assert [r.prefix async for r in store.scan("gold")] == ["1"]
    decks = sorted([k.decode() async for k in client.scan_iter("prepaid:{rates}:deck*")])
    assert decks == ["prepaid:{rates}:deck:1", "prepaid:{rates}:deck:3"]  # gold's first: gone
    await client.aclose()


# -- the CLI -----------------------------------------------------------------------------
def test_rates_commands_take_a_plan(run: Run, decks: dict[str, Path], tmp_path: Path) -> None:
    assert "into plan default (EUR" in run("rates", "import", str(decks["default"])).stdout
    r = run("rates", "import", str(decks["gold"]), "--plan", "gold", "--currency", "usd")
    assert r.exit_code == 0 and "into plan gold (USD" in r.stdout
    gold = ok(run("rates", "lookup", "+4930123", "--plan", "gold", "--json"))
    assert gold["plan"] == "gold" and gold["currency"] == "USD"
    assert gold["rate"]["name"] == "Germany gold"  # type: ignore[index]
    plain = ok(run("rates", "lookup", "+4930123", "--json"))
    assert plain["plan"] == "default" and plain["rate"]["name"] == "Germany"  # type: ignore[index]
    assert "USD 0.03/min" in run("rates", "lookup", "+4930123", "--plan", "gold").stdout
    out = run("rates", "export", "--plan", "gold")
    assert sorted(r.name for r in parse_csv(out.stdout)) == ["Germany gold", "Italy gold"]
    again = ok(run("rates", "import", str(decks["gold"]), "--plan", "gold", "--json"))
    assert again["currency"] == "USD" and again["unchanged"] == 2  # the plan keeps its currency
    assert ok(run("rates", "plans", "--json")) == [  # type: ignore[comparison-overlap]
        {"plan": "default", "currency": "EUR", "version": 1, "rates": 2},
        {"plan": "gold", "currency": "USD", "version": 3, "rates": 2}]


def test_accounts_take_a_plan_and_its_currency(run: Run, decks: dict[str, Path]) -> None:
    run("rates", "import", str(decks["gold"]), "--plan", "gold", "--currency", "USD")
    bob = ok(run("account", "create", "bob", "--plan", "gold", "--json"))
    assert (bob["plan"], bob["currency"]) == ("gold", "USD")
    alice = ok(run("account", "create", "alice", "--json"))
    assert (alice["plan"], alice["currency"]) == ("default", "EUR")  # no deck yet: [billing]
    run("rates", "import", str(decks["gold"]), "--plan", "silver")  # EUR, like alice
    moved = ok(run("account", "set", "alice", "--plan", "silver", "--json"))
    assert moved["plan"] == "silver"
    assert "silver" in run("account", "show", "alice").stdout


def test_the_default_plan_comes_from_the_config(redis_url: str, tmp_path: Path,
                                                decks: dict[str, Path]) -> None:
    conf = tmp_path / "gold.toml"
    conf.write_text(f'[redis]\nurl = "{redis_url}"\n[billing]\ncurrency = "EUR"\n'
                    'default_plan = "gold"\n')
    run = cli(conf)
    assert "into plan gold" in run("rates", "import", str(decks["gold"])).stdout
    assert ok(run("account", "create", "bob", "--json"))["plan"] == "gold"
    assert ok(run("rates", "lookup", "4930", "--json"))["plan"] == "gold"
    conf.write_text(f'[redis]\nurl = "{redis_url}"\n[billing]\ndefault_plan = "a:b"\n')
    refused(cli(conf)("account", "list"), "[billing] default_plan", "'a:b'")


async def test_an_account_of_an_older_release_is_on_the_default_plan(
        run: Run, redis_url: str) -> None:
    assert (await asyncio.to_thread(run, "account", "create", "old")).exit_code == 0
    client = connect(redis_url)
    await client.hdel("prepaid:{acct:old}", "plan")  # as created before plans
    await client.aclose()
    shown = await asyncio.to_thread(run, "account", "show", "old", "--json")
    assert ok(shown)["plan"] == "default"


# -- bad input: one line, nothing changed ----------------------------------------------------
def _state(run: Run) -> tuple[object, object]:
    return (json.loads(run("account", "list", "--json").stdout),
            json.loads(run("rates", "plans", "--json").stdout))


@pytest.mark.parametrize(("args", "words"), [
    (["account", "create", "carol", "--plan", "platinum"], ["'platinum'", "no such plan"]),
    (["account", "create", "carol", "--plan", "gold", "--currency", "EUR"],
     ["'gold'", "USD", "EUR"]),
    (["account", "create", "carol", "--plan", "go:ld"], ["--plan", "'go:ld'"]),
    (["account", "set", "alice", "--plan", "gold"], ["alice", "'gold'", "USD", "EUR"]),
    (["account", "set", "alice", "--plan", "platinum"], ["'platinum'", "no such plan"]),
    (["account", "set", "alice", "--plan", "{x}"], ["--plan", "'{x}'"]),
    (["account", "set", "nobody", "--plan", "gold"], ["'nobody'"]),
    (["rates", "lookup", "4930", "--plan", "platinum"], ["'platinum'", "rates import"]),
    (["rates", "lookup", "4930", "--plan", "gold\n"], ["--plan"]),
    (["rates", "export", "--plan", "platinum"], ["'platinum'"]),
    (["rates", "import", "DEFAULT", "--plan", "a b"], ["--plan", "'a b'"]),
    (["rates", "import", "DEFAULT", "--currency", "USD"],  # alice is on it, in EUR
     ["USD", "'default'", "alice (EUR)"]),
    (["rates", "import", "DEFAULT", "--plan", "gold", "--currency", "EUR", "--dry-run"],
     ["EUR", "'gold'", "bob (USD)"]),
    (["rates", "import", "DEFAULT", "--plan", "silver", "--currency", "XYZ"], ["XYZ"]),
])
def test_plan_mistakes_are_one_line_and_change_nothing(run: Run, decks: dict[str, Path],
                                                       args: list[str],
                                                       words: list[str]) -> None:
    run("rates", "import", str(decks["default"]))
    run("rates", "import", str(decks["gold"]), "--plan", "gold", "--currency", "USD")
    run("account", "create", "alice")
    run("account", "create", "bob", "--plan", "gold")
    before = _state(run)
    refused(run(*[str(decks["default"]) if a == "DEFAULT" else a for a in args]), *words)
    assert _state(run) == before
    assert ok(run("rates", "lookup", "4930", "--json"))["rate"]["name"] == "Germany"  # type: ignore[index]


# -- calls -------------------------------------------------------------------------------
@pytest.fixture
async def agi(redis_url: str) -> AsyncIterator[tuple[Store, AgiServer]]:
    store, server = await start(make_settings(redis_url))
    await store.rates.replace(parse_csv(DEFAULT))
    await store.rates.replace(parse_csv(GOLD), plan="gold")
    yield store, server
    await server.close()
    await store.close()


async def test_two_accounts_on_two_plans_get_their_own_decks_time(
        agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    for ident, plan in (("1001", "default"), ("1002", "gold")):
        await store.ledger.create_account(ident, currency="EUR", plan=plan)
        await store.ledger.credit(ident, EUR, key=f"seed:{ident}")
    # 1 EUR: connect 0.10, then 0.90 at 0.06/min is 15 minutes, at 0.03/min (gold) 30.
    for ident, ref, seconds in (("1001", "r1", "900"), ("1002", "r2", "1800")):
        got = await AgiPeer(agi_env(ref, "00491701234567", callerid=ident)).call(server.port)
        assert got == [GET_CALLER, *variable_commands(
            "ALLOWED", "", ident, ref, seconds, f"{seconds}000:60000")]
    record = fields(await store.redis.hgetall("prepaid:callref:r2"))
    assert record["plan"] == "gold" and '"name": "Germany gold"' in record["rate"]
    # Moved to the default plan, 1002 is rated by its deck from the next call on.
    await store.ledger.update("1002", plan="default")
    got = await AgiPeer(agi_env("r3", "00491701234567", callerid="1002")).call(server.port)
    # 0.13 is held by r2: 0.87 left, 0.10 + 0.06 for the first minute, 11 more at 0.06.
    assert got[1:] == variable_commands("ALLOWED", "", "1002", "r3", "720", "720000:60000")


async def test_a_plan_in_another_currency_is_refused_at_authorization(
        agi: tuple[Store, AgiServer], caplog: pytest.LogCaptureFixture) -> None:
    store, server = agi
    await store.rates.replace(parse_csv(GOLD), plan="usd", currency="USD")
    await store.ledger.create_account("1001", currency="EUR")
    await store.ledger.credit("1001", EUR, key="seed")
    # What a race of 'account set --plan' with 'rates import --currency' could leave.
    await store.ledger.update("1001", plan="usd")
    caplog.set_level(logging.INFO, logger="agi")
    got = await AgiPeer(agi_env("r1", "00491701234567", callerid="1001")).call(server.port)
    assert got == [GET_CALLER, *variable_commands("DENIED", "CURRENCY", "1001", "r1", "0", ""),
                   *DENY_TAIL]
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "1001" in line and "EUR" in line and "'usd'" in line and "USD" in line
    acct = await store.ledger.get("1001")
    assert (acct.balance, acct.held) == (EUR, 0)
    assert not await store.redis.exists("prepaid:callref:r1")


async def test_a_live_call_keeps_its_rate_when_its_plans_deck_is_replaced(
        agi: tuple[Store, AgiServer]) -> None:
    """Authorized over FastAGI at gold's 0.30/min, the deck re-imported at 6.00/min while
    the call is up, then metered from the recorded Asterisk 22 traffic: the old rate."""
    store, server = agi
    rec = load(FIXTURES / "shared" / "answered-caller-hangs-up.ami")
    await store.ledger.create_account("alice", currency="EUR", plan="gold")
    await store.ledger.credit("alice", 10 * EUR, key="seed")
    env = agi_env(rec.ref, rec.number, callerid="alice") | {"agi_channel": rec.channel}
    got = await AgiPeer(env).call(server.port)
    assert got[1].startswith("EXEC MSet PREPAID_STATUS=ALLOWED")
    await store.rates.replace(parse_csv(GOLD.replace("0.30,0.05", "6.00,0.50")), plan="gold")
    assert (await store.rates.lookup(rec.number, NORM, "gold")).per_minute == 6 * EUR
    await replay(Meter(store.ledger), rec.messages)
    old = Rate("39", "Italy gold", per_minute=300_000, connect_fee=50_000, initial=1,
               increment=1)
    # 4 s billed (the CDR's billsec): 0.05 + 4 x 0.005 at the authorized rate.
    acct = await store.ledger.get("alice")
    assert (acct.balance, acct.held) == (10 * EUR - cost(old, 4), 0)
    [(_, logged)] = entries(await store.redis.xrange(calls_key(store.ledger, "alice")))
    assert logged["rate"] == "Italy gold" and int(logged["cost"]) == cost(old, 4) == 70_000
    assert logged["plan"] == "gold"
    # Moved after the call, alice's call still counts under the plan it was rated with.
    await store.ledger.update("alice", plan="default")
    report = await build_report(store, EVER)
    assert {p: (t.count, t.amount) for p, t in report.plans.items()} == {"gold": (1, 70_000)}
