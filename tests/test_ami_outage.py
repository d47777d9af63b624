"""Redis going away mid-call: the listener keeps reading, logs the outage once, catches up."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from ami_listener.meter import Meter
from ami_listener.runners import replay
from prepaid.ledger import Ledger
from prepaid.rating import cost
from prepaid.redis_client import connect
from testbed.ami_peer import FIXTURES, PER_SECOND, authorize, load, open_account
from testbed.servers import RedisServer, free_port


class Proxy:
    """A TCP relay to Redis that the test can cut (connections reset, new ones refused)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.cut = False
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    async def sever(self) -> None:
        self.cut = True
        for w in self._writers:
            w.close()
        self._writers.clear()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def stop(self) -> None:
        await self.sever()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_redis_outage_mid_call_is_logged_once_and_billed_after(
        ledger: Ledger, redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="ami_listener")
    rec = load(FIXTURES / "shared" / "answered-caller-hangs-up.ami")
    await open_account(ledger, 10_000_000)
    await authorize(ledger, rec.ref, rec.channel, rec.number, PER_SECOND)
    proxy = Proxy(redis_server.port)
    await proxy.start()
    client = connect(f"redis://127.0.0.1:{proxy.port}/0", timeout=0.5)
    try:
        meter = Meter(Ledger(client))
        answer = next(i for i, m in enumerate(rec.messages)
                      if m.get("Event") == "BridgeEnter" and m.get("Uniqueid") == rec.ref)
        await replay(meter, rec.messages[:answer + 1])
        assert (await ledger.get("alice")).held == 0  # block 1 settled the hold
        await proxy.sever()
        await replay(meter, rec.messages[answer + 1:])  # the rest, hangup included
        for step in range(1, 6):
            await meter.tick(meter.tracker.now + step)
        assert meter.down and rec.ref in meter.tracker.calls
        proxy.cut = False
        await meter.tick(meter.tracker.now + 10)
        assert not meter.down and rec.ref not in meter.tracker.calls
    finally:
        await client.aclose()
        await proxy.stop()
    assert (await ledger.get("alice")).balance == 10_000_000 - cost(PER_SECOND, 4)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "Redis unavailable" in warnings[0]
    assert [r for r in caplog.records if "Redis is back" in r.getMessage()]
    assert meter.errors == 0
