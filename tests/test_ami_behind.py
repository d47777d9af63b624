"""Metering that trails Asterisk counts as behind, so authorization refuses new calls.

The listener runs against the AMI test peer and a real Redis; the heartbeat it writes is read
back from Redis, as the AGI server reads it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest

from ami_listener.meter import Meter
from ami_listener.runners import LiveRunner
from prepaid.config import AmiSettings
from prepaid.health import read_beat
from prepaid.ledger import Ledger
from testbed.ami_peer import AmiPeer, wait_until


@pytest.fixture
async def peer() -> AsyncIterator[AmiPeer]:
    p = AmiPeer()
    await p.start()
    yield p
    await p.stop()


async def _state(ledger: Ledger) -> str:
    return (await read_beat(ledger.redis, "prepaid", "")).state


async def test_a_starved_event_loop_is_behind_until_it_catches_up(
        ledger: Ledger, peer: AmiPeer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ami_listener")
    settings = AmiSettings(host="127.0.0.1", port=peer.port, username="prepaid",
                           secret="s3cret", reconnect_max_seconds=0.2, behind_seconds=0.3)
    runner = LiveRunner(Meter(ledger), settings, tick=0.02, min_backoff=0.02)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await wait_until(lambda: _is(ledger, "up"), what="an 'up' heartbeat")
        ticked = runner.meter.tracker.now
        await wait_until(lambda: _true(runner.meter.tracker.now > ticked), what="ticking")
        # What a pegged CPU does to the listener: nothing in its loop runs for a while.
        time.sleep(0.6)  # noqa: ASYNC251 - blocking the loop is the fault under test
        await wait_until(lambda: _is(ledger, "behind"), what="a 'behind' heartbeat")
        await wait_until(lambda: _is(ledger, "up"), what="'up' again once caught up")
    finally:
        stop.set()
        async with asyncio.timeout(5):
            await task
    said = [r.getMessage() for r in caplog.records if "trails" in r.getMessage()
            or "caught up" in r.getMessage()]
    assert len(said) == 2, said
    assert "behind_seconds 0.3" in said[0] and "caught up" in said[1]


async def _is(ledger: Ledger, state: str) -> bool:
    return await _state(ledger) == state


async def _true(value: bool) -> bool:
    return value
