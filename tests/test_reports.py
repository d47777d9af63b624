"""``prepaid report``, and ``history`` / ``calls`` over a date range as JSON and CSV, on a
real Redis. The data comes the way it does in production: accounts, top-ups, policies and
cards through the CLI, calls settled by the meter from recorded Asterisk 22 AMI traffic,
an automatic top-up by the policy worker from the crossing a call made."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from ami_listener.meter import Meter
from ami_listener.protocol import split
from ami_listener.runners import replay
from policy.gateway import SandboxGateway
from policy.worker import PolicyWorker
from prepaid import config
from prepaid.ledger import Ledger
from prepaid.money import format_amount
from prepaid.rating import Rate, cost
from prepaid.redis_client import connect
from prepaid.store import open_store
from testbed.ami_peer import FIXTURES, Recording, authorize
from tests.conftest import Run

SHARED = FIXTURES / "shared"
ITALY = Rate("39", "Italy", per_minute=600_000, connect_fee=50_000, initial=1, increment=1)
ROME = Rate("3906", "Rome", per_minute=120_000, connect_fee=0, initial=1, increment=1)


def variant(name: str, n: int) -> Recording:
    """A recording with its channels' uniqueids made unique (the n-th call of that kind)."""
    raw = (SHARED / f"{name}.ami").read_bytes()
    raw = re.sub(rb"(?mi)^(\w*(?:uniqueid|linkedid)): ([0-9]+\.[0-9]+)\r$",
                 lambda m: m[1] + b": " + str(n).encode() + m[2] + b"\r", raw)
    msgs = list(split(raw))
    dial = next(m for m in msgs if m.get("Event") == "DialBegin" and m.get("Uniqueid"))
    return Recording(f"{name}-{n}", msgs, dial["Uniqueid"], dial["Channel"], dial["Exten"])


async def meter_call(ledger: Ledger, account: str, rec: Recording, rate: Rate) -> int:
    """Authorize and settle one call as the AGI and the meter do; returns what it cost."""
    await authorize(ledger, rec.ref, rec.channel, rec.number, rate, account=account)
    await replay(Meter(ledger), rec.messages)
    return cost(rate, rec.billed_duration())


async def redis_ms(ledger: Ledger) -> int:
    seconds, micros = await ledger.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def later_than(ledger: Ledger, ms: int) -> int:
    """Redis's clock once it has passed ``ms`` (polled, with a deadline)."""
    deadline = asyncio.get_running_loop().time() + 5
    while (now := await redis_ms(ledger)) <= ms:
        assert asyncio.get_running_loop().time() < deadline, "Redis's clock stands still"
        await asyncio.sleep(0.001)
    return now


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


@dataclass
class Business:
    costs: dict[str, list[int]]  # account -> its calls' costs, in order
    between: str  # a time after 1001's first call and before its second (ISO)


def cli_ok(run: Run, *args: str) -> Any:
    out = run(*args)
    assert out.exit_code == 0, out.output
    if "--json" in args:
        return json.loads(out.stdout)
    if "--csv" in args:
        return list(csv.DictReader(io.StringIO(out.stdout)))
    return out.stdout


@pytest.fixture
def business(run: Run, redis_url: str, tmp_path: Path) -> Business:
    for account in ("1001", "1002", "1003"):
        cli_ok(run, "account", "create", account, "--email", f"u{account}@example.org")
    cli_ok(run, "topup", "1001", "20.00", "--reference", "INV-1")
    cli_ok(run, "topup", "1002", "5.05", "--reference", "INV-2")
    cli_ok(run, "topup", "1003", "1.00", "--reference", "INV-3")
    cli_ok(run, "policy", "1001", "--threshold", "50", "--action", "email")
    cli_ok(run, "card", "set", "1002", "--token", "tok_ok", "--brand", "visa", "--last4",
           "4242", "--exp", "12/29")
    cli_ok(run, "policy", "1002", "--threshold", "5", "--action", "topup", "--amount", "20")

    async def calls() -> Business:
        client = connect(redis_url)
        ledger = Ledger(client)
        try:
            first = await meter_call(ledger, "1001", variant("answered-caller-hangs-up", 1),
                                     ITALY)
            logged: Any = await client.xrange("prepaid:{acct:1001}:calls")
            [(entry_id, _)] = logged
            between = await later_than(ledger, int(entry_id.decode().split("-")[0]))
            await later_than(ledger, between)
            second = await meter_call(ledger, "1001", variant("answered-callee-hangs-up", 2),
                                      ROME)
            third = await meter_call(ledger, "1002", variant("answered-caller-hangs-up", 3),
                                     ITALY)  # 5.05 - 0.09: below 5, the automatic top-up
            store = await open_store(config.load(tmp_path / "prepaid.toml"))
            try:
                worker = PolicyWorker(store.redis, store.ledger, store.settings,
                                      SandboxGateway(store.redis, store.ledger.prefix),
                                      consumer="w1")
                assert await worker.process_batch() == 1
            finally:
                await store.close()
            return Business({"1001": [first, second], "1002": [third]}, iso(between))
        finally:
            await client.aclose()

    made = asyncio.run(calls())
    cli_ok(run, "account", "suspend", "1003")
    return made


def test_report_adds_up_calls_minutes_revenue_and_top_ups(run: Run, business: Business) -> None:
    italy = business.costs["1001"][0] + business.costs["1002"][0]
    rome = business.costs["1001"][1]
    total = italy + rome
    data = cli_ok(run, "report", "--json")
    assert data["currency"] == "EUR" and data["period"] == {"since": None, "until": None}
    assert data["calls"]["calls"] == 3 and data["calls"]["revenue"] == format_amount(total)
    assert data["calls"]["billed_seconds"] == 4 + 3 + 4  # as the recordings' Cdrs say
    assert data["calls"]["minutes"] == "0.18"  # 11 s
    assert {(d["prefix"], d["destination"], d["calls"], d["revenue"])
            for d in data["by_destination"]} == {
        ("39", "Italy", 2, format_amount(italy)), ("3906", "Rome", 1, format_amount(rome))}
    revenues = [Decimal(d["revenue"]) for d in data["by_destination"]]
    assert revenues == sorted(revenues, reverse=True)
    assert [(p["plan"], p["calls"], p["revenue"]) for p in data["by_plan"]] == [
        ("default", 3, format_amount(total))]
    assert {a["account"]: (a["calls"], a["revenue"]) for a in data["by_account"]} == {
        "1001": (2, format_amount(sum(business.costs["1001"]))),
        "1002": (1, format_amount(business.costs["1002"][0]))}
    assert {t["kind"]: (t["count"], t["amount"]) for t in data["topups"]} == {
        "manual": (3, "26.05"), "automatic": (1, "20.00")}
    assert {w["account"]: w["why"] for w in data["watch"]} == {
        "1001": "below threshold 50.00", "1003": "suspended"}

    table = cli_ok(run, "report")
    for text in ("Italy", "Rome", "default", "manual", "automatic", "suspended",
                 f"EUR {format_amount(total)}"):
        assert text in table
    rows = cli_ok(run, "report", "--csv")
    assert {(r["section"], r["name"]): r["amount"] for r in rows} == {
        ("calls", "all"): format_amount(total), ("destination", "39 Italy"): format_amount(italy),
        ("destination", "3906 Rome"): format_amount(rome),
        ("plan", "default"): format_amount(total),
        ("account", "1001"): format_amount(sum(business.costs["1001"])),
        ("account", "1002"): format_amount(business.costs["1002"][0]),
        ("topup", "manual"): "26.05", ("topup", "automatic"): "20.00",
        ("watch", "1001"): format_amount(20_000_000 - sum(business.costs["1001"])),
        ("watch", "1003"): "1.00"}


def test_the_date_range_selects_what_happened_in_it(run: Run, business: Business) -> None:
    tomorrow = (datetime.now() + timedelta(days=1)).date().isoformat()
    yesterday = (datetime.now() - timedelta(days=1)).date().isoformat()
    today = datetime.now().date().isoformat()
    for args in (["--since", tomorrow], ["--until", yesterday]):
        data = cli_ok(run, "report", *args, "--json")
        assert data["calls"]["calls"] == 0 and data["topups"] == [] and data["by_plan"] == []
        assert len(data["watch"]) == 2  # the accounts as they are now
    whole_day = cli_ok(run, "report", "--since", today, "--until", today, "--json")
    assert whole_day["calls"]["calls"] == 3
    # A time between 1001's two calls splits them.
    after = cli_ok(run, "calls", "1001", "--since", business.between, "--json")
    before = cli_ok(run, "calls", "1001", "--until", business.between, "--json")
    assert [c["rate"] for c in before["calls"]] == ["Italy"]
    assert [c["rate"] for c in after["calls"]] == ["Rome"]
    assert [c["cost"] for c in before["calls"] + after["calls"]] == [
        format_amount(c) for c in business.costs["1001"]]
    late = cli_ok(run, "report", "--since", business.between, "--json")
    assert late["calls"]["calls"] == 2  # Rome on 1001, Italy on 1002
    assert {t["kind"] for t in late["topups"]} == {"automatic"}


def test_calls_and_history_export_every_account_as_csv_and_json(
        run: Run, business: Business) -> None:
    rows = cli_ok(run, "calls", "--csv")
    assert [(r["account"], r["destination"], r["cost"]) for r in rows] == [
        ("1001", "Italy", format_amount(business.costs["1001"][0])),
        ("1001", "Rome", format_amount(business.costs["1001"][1])),
        ("1002", "Italy", format_amount(business.costs["1002"][0]))]
    assert all(datetime.fromisoformat(r["ended"]).tzinfo for r in rows)
    data = cli_ok(run, "calls", "--json")
    assert data["account"] is None and len(data["calls"]) == 3
    assert all(isinstance(c["cost"], str) for c in data["calls"])  # decimal strings

    history = cli_ok(run, "history", "--csv")
    by_account: dict[str, list[dict[str, str]]] = {}
    for r in history:
        by_account.setdefault(r["account"], []).append(r)
    assert sorted(by_account) == ["1001", "1002", "1003"]
    for account, entries in by_account.items():
        assert entries[0]["kind"] == "open"  # oldest first
        balance = cli_ok(run, "balance", account, "--json")["balance"]
        total = sum(Decimal(e["amount"]) for e in entries)
        assert total == Decimal(balance)  # the history adds up to the balance
        assert entries[-1]["balance"] == balance
    one = cli_ok(run, "history", "1002", "--json")  # no range: the last 20, newest first
    assert one[0]["account"] == "1002" and one[0]["reference"].startswith("automatic")
    assert cli_ok(run, "history", "1002", "--json", "--limit", "1") == one[:1]


def test_an_export_longer_than_a_page_comes_whole_and_in_order(run: Run,
                                                               redis_url: str) -> None:
    cli_ok(run, "account", "create", "1001")

    async def top_ups() -> None:
        client = connect(redis_url)
        ledger = Ledger(client)
        await asyncio.gather(*(ledger.credit("1001", 10_000, key=f"topup:r{i}", ref=f"r{i}")
                               for i in range(1234)))
        await client.aclose()

    asyncio.run(top_ups())
    rows = cli_ok(run, "history", "1001", "--csv")
    assert len(rows) == 1235 and len({r["id"] for r in rows}) == 1235
    ids = [tuple(map(int, r["id"].split("-"))) for r in rows]
    assert ids == sorted(ids)
    newest = cli_ok(run, "history", "1001", "--since", "2000-01-01", "--json")
    assert [e["id"] for e in newest] == [r["id"] for r in rows]
    limited = cli_ok(run, "history", "1001", "--csv", "--limit", "600")
    assert [r["id"] for r in limited] == [r["id"] for r in rows[:600]]
    report = cli_ok(run, "report", "--json")
    assert report["topups"] == [{"kind": "manual", "count": 1234, "amount": "12.34"}]


@pytest.mark.parametrize(("args", "message"), [
    (["report", "--since", "2026-13-01"], "--since '2026-13-01' is not a valid date"),
    (["report", "--until", "yesterday"], "--until 'yesterday' is not a date or time"),
    (["report", "--since", "2026-12-05", "--until", "2026-12-01"],
     "--since 2026-12-05 is not before --until 2026-12-01"),
    (["history", "--since", "2026-12-01T10:00", "--until", "2026-12-01T10:00"],
     "is not before --until"),
    (["report", "--json", "--csv"], "--json and --csv: give one of them"),
    (["calls", "9999", "--since", "2026-01-01"], "account '9999' does not exist"),
    (["history", "9999", "--csv"], "account '9999' does not exist"),
    (["calls", "--refused"], "--refused and --outcomes need an ACCOUNT"),
    (["calls", "no such"], "account id 'no such'"),
])
def test_bad_input_is_one_line_and_exit_1(run: Run, args: list[str], message: str) -> None:
    out = run(*args)
    assert out.exit_code == 1
    assert out.stdout == ""  # nothing half-written
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("prepaid: error: ") and message in line


def test_corrections_count_under_their_own_kind_with_their_sign(run: Run) -> None:
    cli_ok(run, "account", "create", "1001")
    cli_ok(run, "topup", "1001", "10.00", "--reference", "INV-1")
    cli_ok(run, "topup", "1001", "5.00", "--reference", "INV-2")
    cli_ok(run, "adjust", "1001", "2.50", "--reason", "goodwill", "--reference", "adj-1")
    cli_ok(run, "adjust", "1001", "-1", "--reason", "typo", "--reference", "adj-2")
    cli_ok(run, "refund", "INV-2", "--reason", "asked for it")
    data = cli_ok(run, "report", "--json")
    assert {t["kind"]: (t["count"], t["amount"]) for t in data["topups"]} == {
        "manual": (2, "15.00"), "adjust": (2, "1.50"), "refund": (1, "-5.00")}
    [entry] = [e for e in cli_ok(run, "history", "1001", "--csv") if e["reference"] == "adj-2"]
    assert (entry["kind"], entry["amount"], entry["reason"]) == ("adjust", "-1.00", "typo")
