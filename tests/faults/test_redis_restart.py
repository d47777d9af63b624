"""Fault 1: Redis killed (SIGKILL) and restarted from its AOF in the middle of an authorized,
metered call, with every service of ``prepaid serve`` running against it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterator
from functools import partial
from pathlib import Path

import pytest
import redis

from prepaid import callrecord, exports
from prepaid.ledger import Ledger
from prepaid.ratedeck import parse_csv
from prepaid.ratestore import RateStore
from prepaid.rating import cost
from prepaid.redis_client import connect
from shell.serve import run_services
from testbed.agi_peer import AgiPeer, agi_env
from testbed.ami_peer import FIXTURES, PER_SECOND, AmiPeer, load, wait_until
from testbed.servers import RedisServer, free_port
from tests.conftest import assert_verified
from tests.faults.conftest import EUR, cli_async, lines, settings
from tests.test_policy_support import Smtp

# The recorded call's number (Italy) at PER_SECOND's prices: 0.05 to connect, 0.01 a second.
DECK = """prefix,name,price_per_minute,connect_fee,initial_increment,increment
39,Italy,0.60,0.05,1,1
"""
START = 10 * EUR


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    server = RedisServer("--appendonly", "yes", "--appendfsync", "always")
    server.start()
    yield server
    server.cleanup()


def kill(server: RedisServer) -> None:
    """A crash, not a shutdown: SIGKILL, so Redis writes nothing on the way out."""
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait(10)
    server.proc = None


async def blocks_paid(ledger: Ledger, ref: str) -> int:
    raw = await ledger.redis.hget(callrecord.record_key("prepaid", ref), "blocks_paid")
    return int(raw or 0)


async def _now(value: bool) -> bool:
    return value


async def _logged(caplog: pytest.LogCaptureFixture, text: str, logger: str,
                  level: int = logging.DEBUG) -> bool:
    return bool(lines(caplog, text, logger=logger, level=level))


async def test_redis_killed_and_restarted_mid_call_bills_exactly_once(
        aof_redis: RedisServer, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.INFO)
    check = redis.Redis(port=aof_redis.port)
    found = check.config_get("append*")
    assert (found["appendonly"], found["appendfsync"]) == ("yes", "always")
    check.close()
    peer = AmiPeer()
    await peer.start()
    smtp = Smtp()
    smtp.start()
    agi_port = free_port()
    conf = settings(aof_redis.url,
                    agi={"listen": f"127.0.0.1:{agi_port}", "timeout": 1.0},
                    ami={"host": "127.0.0.1", "port": peer.port, "username": "prepaid",
                         "secret": "s3cret", "reconnect_max_seconds": 0.2},
                    smtp={"host": "127.0.0.1", "port": smtp.port, "from": "billing@pbx.test",
                          "timeout": 2.0})
    admin = connect(aof_redis.url)
    ledger = Ledger(admin)
    rec = load(FIXTURES / "shared" / "answered-caller-hangs-up.ami")
    answer = next(i for i, m in enumerate(rec.messages)
                  if m.get("Event") == "BridgeEnter" and m.get("Uniqueid") == rec.ref) + 1
    dial = next(i for i, m in enumerate(rec.messages) if m.get("Event") == "DialBegin")
    stop = asyncio.Event()
    serve = asyncio.create_task(run_services(conf, ["agi", "ami", "policy"], stop))
    try:
        await RateStore(admin, "prepaid").replace(parse_csv(DECK))
        await ledger.create_account("1001", currency="EUR", email="ann@example.org",
                                    threshold=START - 80_000, action="email")
        await ledger.credit("1001", START, key="seed", ref="opening balance")
        await wait_until(lambda: _now(peer.logged_in.is_set()), what="listener logged in")
        peer.learn(rec.messages[:dial])  # the caller's channel is up while the AGI runs

        # 1. The call is authorized through FastAGI, answered, and metered.
        caller = AgiPeer(agi_env(rec.ref, rec.number, callerid="1001",
                                 agi_channel=rec.channel, port=agi_port))
        await wait_until(lambda: _serving(agi_port), what="FastAGI listening")
        await caller.call(agi_port)
        assert caller.set_vars["PREPAID_STATUS"] == "ALLOWED"
        await peer.play(rec.messages[:answer])
        await wait_until(lambda: _ge(blocks_paid(ledger, rec.ref), 1), what="block 1 paid")
        # Block 2 falls due a second later; the threshold (9.92) is crossed by block 4,
        # so the low-balance e-mail comes from a debit made after the restart.

        # 2. Redis dies; the call ends while it is away; another call tries to authorize.
        kill(aof_redis)
        await peer.play(rec.messages[answer:])
        refused = AgiPeer(agi_env("during-outage", rec.number, callerid="1001", port=agi_port))
        await refused.call(agi_port, within=3.0)
        assert (refused.set_vars["PREPAID_STATUS"], refused.set_vars["PREPAID_REASON"]) == (
            "ERROR", "INTERNAL")
        for logger, text in (("ami_listener", "metering paused, Redis unavailable"),
                             ("policy.worker", "Redis (policy outbox) unavailable"),
                             ("policy.mailer", "Redis (mail queue) unavailable")):
            await wait_until(partial(_logged, caplog, text, logger, logging.WARNING),
                             within=10, what=f"{logger} noticing the outage")

        # 3. Redis comes back from its append-only file.
        aof_redis.start()
        await wait_until(lambda: _eq_state(ledger, rec.ref, "ended"), within=10,
                         what="call settled after the restart")
        after = AgiPeer(agi_env("after-restart", rec.number, callerid="1001", port=agi_port))
        await after.call(agi_port, within=3.0)
        assert after.set_vars["PREPAID_STATUS"] == "ALLOWED"
        for logger, text in (("ami_listener", "Redis is back"),
                             ("policy.worker", "Redis (policy outbox) recovered"),
                             ("policy.mailer", "Redis (mail queue) recovered"),
                             ("agi", "Redis / rate deck recovered")):
            await wait_until(partial(_logged, caplog, text, logger), within=15,
                             what=f"{logger} recovery")
        await wait_until(lambda: _now(len(smtp.messages) >= 1), within=10,
                         what="the low-balance mail")
    finally:
        stop.set()
        async with asyncio.timeout(15):
            await serve
        smtp.stop()
        await peer.stop()

    try:
        account = await ledger.get("1001")
        charged = cost(PER_SECOND, rec.billed_duration())  # 4 s: 0.05 + 4 x 0.01
        assert charged == 90_000
        assert account.balance == START - charged  # exactly, once
        assert await ledger.holds("1001") == {"call:after-restart": 60_000}  # only the new call
        history = await ledger.history("1001", 1000)
        assert sum(e.amount for e in history) == account.balance
        listed = [c async for c in exports.calls(ledger, "1001")]  # what `prepaid calls` shows
        assert [(c.ref, c.billed, c.cost) for c in listed] == [(rec.ref, 4, charged)]
        [mail] = smtp.messages
        assert mail["Subject"] == "Your prepaid balance is low: EUR 9.91"
        shown = await cli_async(aof_redis.url, tmp_path, "balance", "1001")
        assert shown.output.strip() == (
            "1001: EUR 9.91 (EUR 0.06 held for live calls, EUR 9.85 available)")
        await assert_verified(ledger)
    finally:
        await admin.aclose()
    # What the admin sees: each service logs the outage once and its recovery once.
    for logger, text in (("agi", "Redis / rate deck unavailable"),
                         ("ami_listener", "metering paused, Redis unavailable"),
                         ("policy.worker", "Redis (policy outbox) unavailable"),
                         ("policy.mailer", "Redis (mail queue) unavailable")):
        assert len(lines(caplog, text, logger=logger, level=logging.WARNING)) == 1, logger
    for logger, text in (("agi", "recovered"), ("ami_listener", "Redis is back"),
                         ("policy.worker", "recovered"), ("policy.mailer", "recovered")):
        assert len(lines(caplog, text, logger=logger)) == 1, logger


async def _serving(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def _ge(value: Awaitable[int], n: int) -> bool:
    return await value >= n


async def _eq_state(ledger: Ledger, ref: str, want: str) -> bool:
    try:
        record = await callrecord.read(ledger.redis, "prepaid", ref)
    except ConnectionError:
        return False
    return record is not None and record.state == want
