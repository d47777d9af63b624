"""Why was this call refused? Every authorization outcome, allowed and refused, is kept per
account for a bounded time and shown by ``prepaid calls ACCOUNT --refused``: FastAGI calls
over TCP as Asterisk makes them (testbed/agi_peer.py), the real Redis, the real CLI."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agi.server import AgiServer
from prepaid import keys
from prepaid.ratedeck import parse_csv
from prepaid.store import Store
from testbed.agi_peer import AgiPeer, agi_env
from tests.conftest import Run, cli
from tests.test_agi_fastagi import DECK, EUR, account, make_settings, start
from tests.test_agi_metering import old_beat

GERMANY = "00491701234567"


@pytest.fixture
async def agi(redis_url: str) -> AsyncIterator[tuple[Store, AgiServer]]:
    store, server = await start(make_settings(redis_url, outcomes_keep=50))
    await store.rates.replace(parse_csv(DECK))
    yield store, server
    await server.close()
    await store.close()


async def call(server: AgiServer, ref: str, account_id: str, number: str = GERMANY) -> str:
    """One authorization; its PREPAID_REASON (or ALLOWED), once its outcome is logged."""
    peer = AgiPeer(agi_env(ref, number, callerid=account_id))
    await peer.call(server.port)
    await server.context.drain()
    return peer.set_vars["PREPAID_REASON"] or peer.set_vars["PREPAID_STATUS"]


async def prepaid(run: Run, *args: str) -> Any:
    out = await asyncio.to_thread(run, *args)
    assert out.exit_code == 0, out.output
    return json.loads(out.output) if "--json" in args else out.output


async def test_refusals_show_number_reason_time_and_server(
        agi: tuple[Store, AgiServer], run: Run) -> None:
    store, server = agi
    await account(store, "1001", EUR)
    await account(store, "1002", 0)
    assert await call(server, "pbx1-1700000000.1", "1001") == "ALLOWED"
    assert await call(server, "pbx1-1700000000.2", "1002") == "NO_CREDIT"
    assert await call(server, "pbx1-1700000000.3", "1001", "999123") == "NO_RATE"
    await store.ledger.update("1001", status="suspended")
    assert await call(server, "pbx1-1700000000.4", "1001", "+447700900123") == "SUSPENDED"
    now = (await store.redis.time())[0]

    data = await prepaid(run, "calls", "1001", "--refused", "--json")
    assert data["account"] == "1001" and data["known"] is True
    got = [(o["number"], o["status"], o["reason"], o["ref"], o["server"])
           for o in data["outcomes"]]
    assert got == [("+447700900123", "DENIED", "SUSPENDED", "pbx1-1700000000.4", "pbx1"),
                   ("999123", "DENIED", "NO_RATE", "pbx1-1700000000.3", "pbx1")]  # newest first
    assert all(o["host"] for o in data["outcomes"])
    assert all(abs(o["time"] - now) < 60 for o in data["outcomes"])  # Redis's clock
    every = await prepaid(run, "calls", "1001", "--outcomes", "--json")
    assert [(o["reason"], o["status"], o["max_seconds"]) for o in every["outcomes"]] == [
        ("SUSPENDED", "DENIED", 0), ("NO_RATE", "DENIED", 0), ("", "ALLOWED", 900)]
    other = await prepaid(run, "calls", "1002", "--refused", "--json")
    assert [(o["reason"], o["number"]) for o in other["outcomes"]] == [("NO_CREDIT", GERMANY)]

    table = await prepaid(run, "calls", "1001", "--refused")
    assert "SUSPENDED" in table and "NO_RATE" in table and "+447700900123" in table
    assert "ALLOWED" not in table
    limited = await prepaid(run, "calls", "1001", "--outcomes", "--limit", "1", "--json")
    assert [o["reason"] for o in limited["outcomes"]] == ["SUSPENDED"]


async def test_an_unknown_account_s_refusals_are_kept_apart_without_keys_of_their_own(
        agi: tuple[Store, AgiServer], run: Run) -> None:
    store, server = agi
    assert await call(server, "r1", "9999") == "UNKNOWN_ACCOUNT"
    assert await call(server, "r2", "bad id!") == "UNKNOWN_ACCOUNT"
    assert not await store.redis.exists(keys.outcomes("prepaid", "9999"))
    assert not [k async for k in store.redis.scan_iter("prepaid:{acct:*")]
    data = await prepaid(run, "calls", "9999", "--refused", "--json")
    assert data["known"] is False
    assert [(o["reason"], o["number"], o["ref"]) for o in data["outcomes"]] == [
        ("UNKNOWN_ACCOUNT", GERMANY, "r1")]
    table = await prepaid(run, "calls", "9999", "--refused")
    assert "no such account" in table and "UNKNOWN_ACCOUNT" in table
    # Neither a known account nor any refusal kept: one line, exit 1.
    out = await asyncio.to_thread(run, "calls", "7777", "--refused")
    assert out.exit_code == 1
    assert out.output.strip().splitlines() == ["prepaid: error: account '7777' does not exist"]


async def test_the_outcomes_stay_bounded_in_number_and_in_time(
        agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    await account(store, "1001", 0)
    for i in range(400):  # make_settings: outcomes_keep 50
        assert await call(server, f"r{i}", "1001") == "NO_CREDIT"
    key = keys.outcomes("prepaid", "1001")
    # MAXLEN ~ trims whole stream nodes (100 entries each), never below the cap.
    assert 50 <= await store.redis.xlen(key) <= 150
    newest: Any = await store.redis.xrevrange(key, count=1)
    assert newest[0][1][b"ref"] == b"r399"
    # An account that stops calling loses them with the key: [agi] outcomes_days, 30.
    assert 30 * 86_400_000 - 60_000 < await store.redis.pttl(key) <= 30 * 86_400_000


async def test_outcomes_keep_0_keeps_none(redis_url: str) -> None:
    store, server = await start(make_settings(redis_url, outcomes_keep=0))
    try:
        await store.rates.replace(parse_csv(DECK))
        await account(store, "1001", 0)
        assert await call(server, "r1", "1001") == "NO_CREDIT"
        assert await call(server, "r2", "9999") == "UNKNOWN_ACCOUNT"
        assert [k async for k in store.redis.scan_iter("prepaid:*outcomes*")] == []
    finally:
        await server.close()
        await store.close()


def test_outcome_settings_from_the_config(redis_url: str, tmp_path: Path) -> None:
    conf = tmp_path / "prepaid.toml"
    conf.write_text(f'[redis]\nurl = "{redis_url}"\n[agi]\noutcomes_keep = "many"\n')
    out = cli(conf)("calls", "1001", "--refused")
    assert out.exit_code == 1
    assert "[agi] outcomes_keep must be a whole number" in out.output


async def test_no_metering_refusals_are_kept_before_the_account_is_read(
        redis_url: str, run: Run) -> None:
    store, server = await start(make_settings(redis_url, metering_stale_seconds=5.0))
    try:
        await store.rates.replace(parse_csv(DECK))
        await account(store, "1001", EUR)
        await old_beat(store.redis, age=6.0)  # this server's listener: silent for 6 s
        assert await call(server, "m1", "1001") == "NO_METERING"
        assert await call(server, "m2", "9999") == "NO_METERING"
        assert not await store.redis.exists(keys.outcomes("prepaid", "9999"))
    finally:
        await server.close()
        await store.close()
    known = await prepaid(run, "calls", "1001", "--refused", "--json")
    assert [(o["status"], o["reason"], o["ref"]) for o in known["outcomes"]] == [
        ("ERROR", "NO_METERING", "m1")]
    unknown = await prepaid(run, "calls", "9999", "--refused", "--json")
    assert unknown["known"] is False
    assert [(o["reason"], o["ref"]) for o in unknown["outcomes"]] == [("NO_METERING", "m2")]


async def test_an_outcome_that_cannot_be_written_never_fails_the_call_and_is_logged_once(
        agi: tuple[Store, AgiServer], caplog: pytest.LogCaptureFixture) -> None:
    store, server = agi
    await account(store, "1001", EUR)
    key = keys.outcomes("prepaid", "1001")
    await store.redis.set(key, "not a stream")  # every XADD to it fails (WRONGTYPE)
    caplog.set_level(logging.DEBUG, logger="agi.routes")
    assert await call(server, "w1", "1001") == "ALLOWED"
    assert await call(server, "w2", "1001") == "ALLOWED"
    assert await store.ledger.holds("1001") == {"call:w1": 160_000, "call:w2": 160_000}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1
    assert errors[0].startswith("Redis (logging authorization outcomes) unavailable: ")
    await store.redis.delete(key)
    assert await call(server, "w3", "1001") == "ALLOWED"
    recovered = [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
    assert recovered == ["Redis (logging authorization outcomes) recovered after 2 failure(s)"]
    assert await store.redis.xlen(key) == 1
