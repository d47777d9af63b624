"""The live listener over TCP against the AMI test peer, a real Redis and recorded traffic."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ami_listener.meter import Meter, calls_key
from ami_listener.runners import LiveRunner
from prepaid.callrecord import record_key
from prepaid.config import AmiSettings
from prepaid.ledger import Ledger
from prepaid.rating import block_cost, cost
from testbed.ami_peer import (
    FIXTURES,
    PER_SECOND,
    RECORDINGS,
    AmiPeer,
    Listener,
    Recording,
    authorize,
    load,
    open_account,
    wait_until,
)
from testbed.replies import entries
from testbed.servers import RedisServer
from tests.conftest import Run

START = 10_000_000
SHARED = FIXTURES / "shared"


@pytest.fixture
async def peer() -> AsyncIterator[AmiPeer]:
    p = AmiPeer()
    await p.start()
    yield p
    await p.stop()


async def ended(ledger: Ledger, ref: str) -> bool:
    return await ledger.redis.hget(record_key("prepaid", ref), "state") == b"ended"


async def bill(ledger: Ledger, peer: AmiPeer, rec: Recording) -> None:
    async with Listener(ledger, peer):
        await peer.play(rec.messages)
        await wait_until(lambda: ended(ledger, rec.ref), what=f"{rec.name} settled")


@pytest.mark.parametrize("path", [p for p in RECORDINGS if "ringing" not in p.stem],
                         ids=lambda p: p.parent.name + "/" + p.stem)
async def test_live_listener_bills_recorded_calls_exactly(ledger: Ledger, peer: AmiPeer,
                                                          path: Path) -> None:
    rec = load(path)
    await open_account(ledger, START)
    await authorize(ledger, rec.ref, rec.channel, rec.number, PER_SECOND)
    await bill(ledger, peer, rec)
    account = await ledger.get("alice")
    assert account.balance == START - cost(PER_SECOND, rec.billed_duration())
    assert account.held == 0
    login = peer.sent("Login")[0]
    assert login["Username"] == "prepaid" and login["Events"] == "call,cdr,dialplan"
    assert len(peer.sent("CoreShowChannels")) == 1


async def test_restart_mid_call_resumes_without_double_charge(ledger: Ledger,
                                                              peer: AmiPeer) -> None:
    rec = load(SHARED / "answered-caller-hangs-up.ami")
    await open_account(ledger, START)
    await authorize(ledger, rec.ref, rec.channel, rec.number, PER_SECOND)
    cut = next(i for i, m in enumerate(rec.messages) if m.get("Event") == "Cdr")
    async with Listener(ledger, peer):  # first listener: answer, blocks up to 3.5 s
        await peer.play(rec.messages[:cut])
        await wait_until(lambda: _paid(ledger, rec.ref, 4), what="4 blocks paid")
    async with Listener(ledger, peer):  # a new process: resumes from Redis
        await peer.play(rec.messages[cut:])
        await wait_until(lambda: ended(ledger, rec.ref), what="call settled")
    account = await ledger.get("alice")
    assert account.balance == START - cost(PER_SECOND, 4) and account.held == 0  # billsec 4
    assert len(entries(await ledger.redis.xrange(calls_key(ledger, "alice")))) == 1


async def _paid(ledger: Ledger, ref: str, n: int) -> bool:
    raw = await ledger.redis.hget(record_key("prepaid", ref), "blocks_paid")
    return raw is not None and int(raw) >= n


async def test_link_drop_reconnects_logs_once_and_bills_once(
        ledger: Ledger, peer: AmiPeer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="ami_listener")
    rec = load(SHARED / "answered-callee-hangs-up.ami")
    await open_account(ledger, START)
    await authorize(ledger, rec.ref, rec.channel, rec.number, PER_SECOND)
    cut = next(i for i, m in enumerate(rec.messages)
               if m.get("Event") == "BridgeEnter" and m.get("Uniqueid") == rec.ref) + 1
    async with Listener(ledger, peer) as listener:
        await peer.play(rec.messages[:cut])
        await wait_until(lambda: _paid(ledger, rec.ref, 1), what="block 1 paid")
        server, peer._server = peer._server, None  # refuse reconnects for a while
        assert server is not None
        server.close()
        await server.wait_closed()
        await peer.drop()
        await wait_until(lambda: _async(listener.runner.sessions == 1 and
                                        not listener.runner.connected.is_set()),
                         what="listener notices the drop")
        peer._server = await asyncio.start_server(peer._serve, "127.0.0.1", peer.port)
        await wait_until(lambda: _async(peer.logins == 2), what="listener logs in again")
        await wait_until(lambda: _async(listener.runner.connected.is_set()), what="listing")
        await peer.play(rec.messages[cut:])
        await wait_until(lambda: ended(ledger, rec.ref), what="call settled")
    assert (await ledger.get("alice")).balance == START - cost(PER_SECOND, 3)  # billsec 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([w for w in warnings if "AMI link lost" in w]) == 1
    assert len([w for w in warnings if "retrying with backoff" in w]) <= 1
    assert [r for r in caplog.records if "is back" in r.getMessage()]


async def _async(value: bool) -> bool:
    return value


async def test_call_that_ended_while_away_releases_its_hold(ledger: Ledger,
                                                            peer: AmiPeer) -> None:
    rec = load(SHARED / "ringing-caller-abandons.ami")  # stops while the call rings
    await open_account(ledger, START)
    await authorize(ledger, rec.ref, rec.channel, rec.number, PER_SECOND)
    async with Listener(ledger, peer) as listener:
        await peer.play(rec.messages)
        await wait_until(lambda: _async(rec.ref in listener.meter.tracker.calls and
                                        listener.meter.tracker.calls[rec.ref].info is not None),
                         what="call tracked")
    assert (await ledger.get("alice")).held == block_cost(PER_SECOND, 1)
    peer.channels.clear()  # Asterisk restarted meanwhile: the call is gone
    async with Listener(ledger, peer):
        await wait_until(lambda: ended(ledger, rec.ref), what="call closed")
    account = await ledger.get("alice")
    assert account.balance == START and account.held == 0


@pytest.mark.parametrize("name", ["answered-caller-hangs-up", "answered-callee-hangs-up",
                                  "busy"])
async def test_attaching_at_every_point_of_the_stream(ledger: Ledger, redis_server: RedisServer,
                                                      name: str) -> None:
    """A listener that starts anywhere in the call: no crash, no double or negative charge,
    no reservation left at the end."""
    rec = load(SHARED / f"{name}.ami")
    full = cost(PER_SECOND, rec.billed_duration())
    events = [m for m in rec.messages if "Event" in m]
    for start in range(len(events) + 1):
        redis_server.flush()
        await open_account(ledger, START)
        await authorize(ledger, rec.ref, rec.channel, rec.number, PER_SECOND)
        peer = AmiPeer()
        await peer.start()
        try:
            peer.learn(events[:start])  # what Asterisk knows when the listener attaches
            async with Listener(ledger, peer) as listener:
                await peer.play(events[start:])
                await wait_until(lambda: ended(ledger, rec.ref), what=f"settled from {start}")
                assert listener.meter.errors == 0
        finally:
            await peer.stop()
        account = await ledger.get("alice")
        assert account.held == 0, start
        assert START - full <= account.balance <= START, start
        assert len(entries(await ledger.redis.xrange(calls_key(ledger, "alice")))) == 1, start


async def test_calls_command_shows_the_metered_calls(ledger: Ledger, peer: AmiPeer,
                                                     run: Run) -> None:
    rec = load(SHARED / "answered-caller-hangs-up.ami")
    await open_account(ledger, START)
    await authorize(ledger, rec.ref, rec.channel, rec.number, PER_SECOND)
    await bill(ledger, peer, rec)
    out = await asyncio.to_thread(run, "calls", "alice", "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["currency"] == "EUR"
    assert [(c["number"], c["billed"], c["cost"]) for c in data["calls"]] == [
        ("00390612345678", 4, "0.09")]
    table = await asyncio.to_thread(run, "calls", "alice")
    assert table.exit_code == 0 and "EUR 0.09" in table.output
    assert "00390612345678" in table.output
    bad = await asyncio.to_thread(run, "calls", "no such")
    assert bad.exit_code == 1 and "account id 'no such'" in bad.output


async def test_a_quiet_link_answering_pings_is_kept(ledger: Ledger, peer: AmiPeer,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    # No calls for many ping intervals: Asterisk's answers to Ping keep the link up.
    caplog.set_level(logging.INFO, logger="ami_listener")
    settings = AmiSettings(host="127.0.0.1", port=peer.port, username="prepaid",
                           secret="s3cret", reconnect_max_seconds=0.2)
    runner = LiveRunner(Meter(ledger), settings, tick=0.02, ping=0.05, min_backoff=0.02)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await wait_until(lambda: _async(len(peer.sent("Ping")) >= 6), what="six pings")
    finally:
        stop.set()
        async with asyncio.timeout(5):
            await task
    assert peer.logins == 1 and runner.sessions == 1
    assert not [r for r in caplog.records if "silent" in r.getMessage()]
