"""No unmetered calls: FastAGI asks this server's metering heartbeat before it authorizes.

Real Redis, real AGI wire format. Old beats are written with Redis' own clock (the one the
gate compares with), so no test waits for a beat to age, except the one that checks a
listener that never beats is refused once the limit has passed (a bounded poll).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import pytest

import prepaid.health as health
from agi.server import AgiServer
from prepaid.health import MeterBeat, MeteringGate, beat, judge, meter_key, read_beat
from prepaid.ratedeck import parse_csv
from prepaid.redis_client import RedisClient, connect
from prepaid.store import Store
from testbed.agi_peer import DENY_TAIL, GET_CALLER, AgiPeer, agi_env, variable_commands
from testbed.replies import fields
from tests.test_agi_fastagi import DECK, EUR, account, make_settings, start

NUMBER = "00491701234567"
PREFIX = "prepaid"


async def old_beat(redis: RedisClient, age: float, state: str = "up", system_name: str = "",
                   backlog: int = 0) -> None:
    """A heartbeat written ``age`` seconds ago by Redis' clock."""
    seconds, micros = await redis.time()
    at = seconds + micros / 1e6 - age
    key = meter_key(PREFIX, system_name)
    await redis.hset(key, mapping={"state": state, "backlog": str(backlog), "at": f"{at:.6f}"})
    await redis.pexpire(key, 10_000)


@pytest.fixture
async def gated(redis_url: str) -> AsyncIterator[tuple[Store, AgiServer]]:
    """A FastAGI server with the shipped metering settings (stale after 5 s, no unmetered)."""
    store, server = await start(make_settings(redis_url, metering_stale_seconds=5.0))
    await store.rates.replace(parse_csv(DECK))
    await account(store, "1001", EUR)
    yield store, server
    await server.close()
    await store.close()


async def call(server: AgiServer, ref: str) -> AgiPeer:
    peer = AgiPeer(agi_env(ref, NUMBER, callerid="1001"), variables={"CHANNEL(linkedid)": ref})
    await peer.call(server.port)
    return peer


def outcome(peer: AgiPeer) -> tuple[str, str]:
    return peer.set_vars["PREPAID_STATUS"], peer.set_vars["PREPAID_REASON"]


async def test_a_heartbeat_older_than_the_limit_refuses_no_metering(
        gated: tuple[Store, AgiServer]) -> None:
    store, server = gated
    await old_beat(store.redis, age=6.0)
    peer = await call(server, "m1")
    assert peer.commands == [GET_CALLER, *variable_commands(
        "ERROR", "NO_METERING", "1001", "m1", "0", ""), *DENY_TAIL]
    # Refused before anything was reserved or recorded.
    assert await store.ledger.holds("1001") == {}
    assert not await store.redis.exists(f"{PREFIX}:callref:m1")


async def test_a_fresh_up_beat_allows(gated: tuple[Store, AgiServer]) -> None:
    store, server = gated
    await beat(store.redis, PREFIX, "", state="up", backlog=3)
    peer = await call(server, "m2")
    assert outcome(peer) == ("ALLOWED", "")
    assert await store.ledger.holds("1001") == {"call:m2": 160_000}


async def test_a_3_s_listener_restart_refuses_no_call(gated: tuple[Store, AgiServer]) -> None:
    store, server = gated
    await old_beat(store.redis, age=3.0)
    assert outcome(await call(server, "m3")) == ("ALLOWED", "")


@pytest.mark.parametrize("state", ["behind", "down"])
async def test_behind_or_down_refuses_at_once(gated: tuple[Store, AgiServer],
                                              state: str) -> None:
    store, server = gated
    await beat(store.redis, PREFIX, "", state=state, backlog=20_000)
    assert outcome(await call(server, "m4")) == ("ERROR", "NO_METERING")
    assert await store.ledger.holds("1001") == {}


async def test_a_listener_that_never_beats_is_refused_once_the_limit_has_passed(
        redis_url: str) -> None:
    stale = 0.5
    began = time.monotonic()
    store, server = await start(make_settings(redis_url, metering_stale_seconds=stale))
    try:
        await store.rates.replace(parse_csv(DECK))
        await account(store, "1001", 1000 * EUR)  # each allowed call holds 0.16
        deadline = time.monotonic() + 10
        n = 0
        while True:
            n += 1
            peer = await call(server, f"never{n}")
            if outcome(peer) == ("ERROR", "NO_METERING"):
                break
            assert outcome(peer) == ("ALLOWED", ""), peer.set_vars
            assert time.monotonic() < deadline, "never refused"
            await asyncio.sleep(0.05)
        # Not before the limit: the server's start is when a missing beat starts to count.
        assert time.monotonic() - began >= stale
    finally:
        await server.close()
        await store.close()


async def test_allow_unmetered_lets_calls_through_and_warns_once(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    store, server = await start(make_settings(redis_url, metering_stale_seconds=5.0,
                                              allow_unmetered=True))
    try:
        await store.rates.replace(parse_csv(DECK))
        await account(store, "1001", EUR)
        await beat(store.redis, PREFIX, "", state="down", backlog=0)
        for i in range(3):
            assert outcome(await call(server, f"u{i}")) == ("ALLOWED", "")
        warnings = [r.getMessage() for r in caplog.records
                    if r.levelno == logging.WARNING and "UNBILLED" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert "allow_unmetered = true" in warnings[0]
        assert len(await store.ledger.holds("1001")) == 3
    finally:
        await server.close()
        await store.close()


async def test_the_outage_and_its_end_are_logged_once_not_per_call(
        gated: tuple[Store, AgiServer], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store, server = gated
    await beat(store.redis, PREFIX, "", state="behind", backlog=19_000)
    for i in range(5):
        assert outcome(await call(server, f"b{i}")) == ("ERROR", "NO_METERING")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["metering of server (no [ami] system_name) is away: metering is behind "
                      "(19000 events waiting); new calls are refused (ERROR NO_METERING)"]
    await beat(store.redis, PREFIX, "", state="up", backlog=0)
    deadline = time.monotonic() + 5  # the gate's answer is cached for up to 0.5 s
    n = 0
    while outcome(await call(server, f"back{n}")) != ("ALLOWED", ""):
        assert time.monotonic() < deadline, "metering never seen back"
        n += 1
        await asyncio.sleep(0.05)
    back = [r.getMessage() for r in caplog.records if "is back" in r.getMessage()]
    assert len(back) == 1 and back[0].startswith("metering of server (no [ami] system_name) "
                                                 "is back (up, backlog 0")


async def test_the_server_named_by_system_name_is_the_one_asked(redis_url: str) -> None:
    store, server = await start(make_settings(redis_url, metering_stale_seconds=5.0))
    try:
        await store.rates.replace(parse_csv(DECK))
        await account(store, "1001", EUR)
        settings = dataclasses.replace(store.settings, ami=dataclasses.replace(
            store.settings.ami, system_name="pbx-a"))
        gate = MeteringGate.for_settings(store.redis, settings, watching_since=None)
        await beat(store.redis, PREFIX, "pbx-b", state="up", backlog=0)  # another server
        assert not (await gate.check()).ok
        await beat(store.redis, PREFIX, "pbx-a", state="up", backlog=0)
        gate = MeteringGate.for_settings(store.redis, settings, watching_since=None)
        assert (await gate.check()).ok
        assert await store.redis.exists("prepaid:meter:pbx-a", "prepaid:meter:pbx-b") == 2
    finally:
        await server.close()
        await store.close()


async def test_under_load_one_read_serves_every_call_for_half_a_second(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store, server = await start(make_settings(redis_url, metering_stale_seconds=5.0))
    reads = 0
    real = health.read_beat

    async def counted(*args: object) -> MeterBeat:
        nonlocal reads
        reads += 1
        return await real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(health, "read_beat", counted)
    try:
        await beat(store.redis, PREFIX, "", state="up", backlog=0)
        gate = server.context.metering
        began = time.monotonic()
        verdicts = await asyncio.gather(*(gate.check() for _ in range(200)))
        assert all(v.ok for v in verdicts)
        if time.monotonic() - began < gate.cache_seconds:
            assert reads == 1
    finally:
        await server.close()
        await store.close()


async def test_heartbeat_hash_ttl_and_redis_clock(redis_url: str) -> None:
    redis = connect(redis_url)
    try:
        await beat(redis, PREFIX, "pbx-a", state="behind", backlog=7, ttl=10.0)
        raw = fields(await redis.hgetall("prepaid:meter:pbx-a"))
        assert set(raw) == {"state", "backlog", "at"}
        assert 9_000 < await redis.pttl("prepaid:meter:pbx-a") <= 10_000
        seconds, _ = await redis.time()
        assert abs(float(raw["at"]) - seconds) < 2
        got = await read_beat(redis, PREFIX, "pbx-a")
        assert (got.state, got.backlog) == ("behind", 7) and 0 <= got.age < 1
        assert (await read_beat(redis, PREFIX, "nowhere")).state == "missing"
        with pytest.raises(ValueError):
            await beat(redis, PREFIX, "pbx-a", state="fine", backlog=0)
    finally:
        await redis.aclose()


def test_judge() -> None:
    up = MeterBeat("a", "up", 0, 100.0, 1.0)
    assert judge(up, 5.0, missing_for=0).ok
    assert not judge(MeterBeat("a", "up", 0, 100.0, 5.5), 5.0, missing_for=0).ok
    assert judge(MeterBeat("a", "missing"), 5.0, missing_for=4.9).ok
    assert not judge(MeterBeat("a", "missing"), 5.0, missing_for=5.1).ok
    assert not judge(MeterBeat("a", "behind", 9, 100.0, 0.0), 5.0, missing_for=0).ok
    assert not judge(MeterBeat("a", "down", 0, 100.0, 0.0), 5.0, missing_for=0).ok
