"""Fault 2: the AMI link cut for 30 s while calls end; settled from the Cdr or the last paid
block after it returns, no reservation left, nothing charged twice."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from functools import partial

import pytest

from ami_listener.meter import Meter
from ami_listener.protocol import Message
from ami_listener.runners import LiveRunner
from prepaid import callrecord, exports
from prepaid.config import AmiSettings
from prepaid.ledger import Ledger
from prepaid.rating import Rate, cost, covered_seconds
from testbed.ami_peer import FIXTURES, Recording, authorize, load, open_account, wait_until
from tests.conftest import assert_verified
from tests.faults.conftest import US, AmiRelay, BacklogPeer, lines, retime, with_billsec

START = 10_000_000
# 0.60/min and 0.05 to connect, in 6 s blocks (6/6 billing): 0.11 for the first, 0.06 each.
SIX = Rate("", "six-second blocks", per_minute=600_000, connect_fee=50_000, initial=6,
           increment=6)
T0 = 1_900_000_000 * US  # every call is re-timed to be answered (or dialed) at T0
CUT = 30  # seconds the link is away, in Asterisk's time


def event_index(rec: Recording, event: str) -> int:
    return next(i for i, m in enumerate(rec.messages)
                if m.get("Event") == event and m.get("Uniqueid") == rec.ref)


def at_t0(rec: Recording) -> list[Message]:
    """The recording re-timed so that its call is answered (or, unanswered, dialed) at T0."""
    answer, _ = rec.times()
    anchor = answer if answer is not None else int(
        float(rec.messages[event_index(rec, "DialBegin")]["Timestamp"]) * US)
    return retime(rec.messages, T0 - anchor)


@pytest.fixture
async def peer() -> AsyncIterator[BacklogPeer]:
    p = BacklogPeer()
    await p.start()
    yield p
    await p.stop()


async def state(ledger: Ledger, ref: str) -> str:
    record = await callrecord.read(ledger.redis, "prepaid", ref)
    return record.state if record is not None else ""


async def blocks_paid(ledger: Ledger, ref: str) -> int:
    raw = await ledger.redis.hget(callrecord.record_key("prepaid", ref), "blocks_paid")
    return int(raw or 0)


async def test_ami_link_cut_for_30_s_while_calls_end(
        ledger: Ledger, peer: BacklogPeer, redis_url: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="ami_listener")
    shared = FIXTURES / "shared"
    a = load(shared / "answered-caller-hangs-up.ami")  # Hangup and Cdr lost in the cut
    b = load(shared / "answered-callee-hangs-up.ami")  # Hangup lost, Cdr as the link returns
    c = load(shared / "busy.ami")  # dialing at the cut, busy during it
    d = load(FIXTURES / "testbed-answered-callee-hangs-up.ami")  # up through the cut
    calls = {"a": a, "b": b, "c": c, "d": d}
    msgs = {acct: at_t0(rec) for acct, rec in calls.items()}
    split = {acct: event_index(rec, "BridgeEnter") + 1 for acct, rec in calls.items()
             if acct != "c"}
    split["c"] = event_index(c, "DialBegin") + 1

    relay = AmiRelay(peer.port)
    await relay.start()
    meter = Meter(ledger)
    ami = AmiSettings(host="127.0.0.1", port=relay.port, username="prepaid", secret="s3cret",
                      reconnect_max_seconds=0.2)
    runner = LiveRunner(meter, ami, tick=0.02, ping=0.1, min_backoff=0.02)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await wait_until(lambda: _now(runner.connected.is_set() and not meter.tracker.listing
                                      and len(peer.sent("CoreShowChannels")) == 1),
                         what="listener connected")
        for acct, rec in calls.items():  # the AGI authorizes them while the listener runs
            await open_account(ledger, START, acct)
            await authorize(ledger, rec.ref, rec.channel, rec.number, SIX, account=acct)
        for acct in calls:
            await peer.play(msgs[acct][:split[acct]])
        for acct in ("a", "b", "d"):
            ref = calls[acct].ref
            await wait_until(partial(_paid_at_least, ledger, ref, 1),
                             what=f"block 1 of {acct}")
        await wait_until(lambda: _now(c.ref in meter.tracker.calls and
                                      meter.tracker.calls[c.ref].info is not None),
                         what="call c tracked")

        await relay.cut()  # the link goes silent: no FIN, no RST
        await wait_until(lambda: _now(not runner.connected.is_set()), what="cut noticed")
        paid_a = await blocks_paid(ledger, a.ref)
        # Asterisk goes on meanwhile; what it sends is lost in the cut.
        b_rest = retime(msgs["b"][split["b"]:], 20 * US)  # b talks 20 s more, then hangs up
        b_cdr = next(m for m in b_rest if m.get("Event") == "Cdr"
                     and m.get("UniqueID") == b.ref)
        await peer.play(msgs["a"][split["a"]:])
        await peer.play([m for m in b_rest if m is not b_cdr])
        await peer.play(msgs["c"][split["c"]:])
        await wait_until(lambda: _now(relay.dropped > 0), what="events lost in the cut")
        assert set(peer.channels) & {a.ref, b.ref, c.ref} == set()  # Asterisk: they ended
        assert d.ref in peer.channels
        peer.backlog = [with_billsec(b_cdr, 20)]  # posted as the link comes back

        await relay.restore()
        await wait_until(lambda: _now(peer.logins == 2), what="listener logs in again")
        for acct in ("a", "b", "c"):
            ref = calls[acct].ref
            await wait_until(partial(_in_state, ledger, ref, "ended"),
                             what=f"call {acct} settled after the link returned")
        # d: 30 s more, then ends; its CDR says so (the recording's said 3 s).
        await peer.play([with_billsec(m, CUT) if m.get("Event") == "Cdr"
                         and m.get("UniqueID") == d.ref else m
                         for m in retime(msgs["d"][split["d"]:], CUT * US)])
        await wait_until(partial(_in_state, ledger, d.ref, "ended"), what="call d settled")
        assert meter.errors == 0
    finally:
        stop.set()
        async with asyncio.timeout(5):
            await task
        await relay.stop()

    expected = {
        "a": cost(SIX, covered_seconds(SIX, paid_a)),  # the last paid block: no Cdr
        "b": cost(SIX, 3 + 20),  # its Cdr's billable seconds
        "c": 0,  # busy: the reservation is released
        "d": cost(SIX, 3 + CUT),  # paid block by block through the cut; its Cdr
    }
    if paid_a == 1:  # as good as the Cdr: 4 s billed in a 6 s first block
        assert expected["a"] == cost(SIX, a.billed_duration())
    sources = {"a": "estimate", "b": "cdr", "c": "events", "d": "cdr"}
    for acct in calls:
        account = await ledger.get(acct)
        assert account.balance == START - expected[acct], acct
        assert account.held == 0 and await ledger.holds(acct) == {}, acct  # no leak
        history = await ledger.history(acct, 1000)
        assert sum(e.amount for e in history) == account.balance, acct
        listed = [c async for c in exports.calls(ledger, acct)]  # what `prepaid calls` shows
        assert [(x.cost, x.source) for x in listed] == [(expected[acct], sources[acct])]
    assert len(peer.sent("CoreShowChannels")) == 2
    await assert_verified(ledger)
    # What the admin sees: the loss once (failed reconnects only at DEBUG), the return once.
    [lost] = lines(caplog, "AMI link lost", level=logging.WARNING)
    assert "silent" in lost  # noticed by unanswered Pings: a dead path sends no FIN
    assert lines(caplog, "AMI still unavailable", level=logging.DEBUG)
    assert not lines(caplog, "retrying with backoff", level=logging.WARNING)
    assert len(lines(caplog, "is back", level=logging.INFO)) == 1
    assert not lines(caplog, "", logger="ami_listener", level=logging.ERROR)
    assert len(lines(caplog, "ended while the listener was away")) == 3


async def _now(value: bool) -> bool:
    return value


async def _paid_at_least(ledger: Ledger, ref: str, n: int) -> bool:
    return await blocks_paid(ledger, ref) >= n


async def _in_state(ledger: Ledger, ref: str, want: str) -> bool:
    return await state(ledger, ref) == want
