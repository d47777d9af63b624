"""Runners feed the one meter: live from an AMI connection, or from a raw recording.

The live runner reconnects with backoff (logging the loss once and the return once), and
after every (re)connect resumes the calls Redis holds as live and lists the channels still
up.  It owns its two tasks (reader, ticker) and cancels and awaits them on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from pathlib import Path

from ami_listener.client import AmiClient, AmiError
from ami_listener.meter import Discard, Meter
from ami_listener.protocol import Message, ProtocolError, split, timestamp_us
from ami_listener.tracker import US
from prepaid import metrics
from prepaid.config import AmiSettings

log = logging.getLogger(__name__)

TICK_SECONDS = 0.25
PING_SECONDS = 20.0


class AsteriskClock:
    """Asterisk's time, estimated from event timestamps (never ahead of it) or the wall."""

    def __init__(self) -> None:
        self.offset: int | None = None  # Asterisk time minus our monotonic time, in us

    def seen(self, stamp_us: int) -> None:
        sample = stamp_us - int(time.monotonic() * US)
        if self.offset is None or sample > self.offset or sample < self.offset - 5 * US:
            self.offset = sample  # the least delayed sample; a big jump means a clock reset

    def now_us(self) -> int:
        if self.offset is None:
            return int(time.time() * US)
        return int(time.monotonic() * US) + self.offset


async def handle_safely(meter: Meter, msg: Message) -> None:
    """A bug in handling one event is logged; it never ends the loop."""
    try:
        await meter.handle(msg)
    except Exception:
        meter.errors += 1
        log.exception("handling AMI %s event failed", msg.get("Event", "?"))


async def replay(meter: Meter, messages: Iterable[Message]) -> int:
    """The file runner: every event of a recording through the meter; returns how many."""
    count = 0
    for msg in messages:
        if "Event" in msg:
            await handle_safely(meter, msg)
            count += 1
    return count


def read_recording(path: Path) -> list[Message]:
    return list(split(path.read_bytes()))


class LiveRunner:
    def __init__(self, meter: Meter, settings: AmiSettings, *, tick: float = TICK_SECONDS,
                 ping: float = PING_SECONDS, min_backoff: float = 0.5) -> None:
        self.meter = meter
        self.settings = settings
        self.tick = tick
        self.ping = ping
        self._name_warned = False
        self.min_backoff = min_backoff
        self.clock = AsteriskClock()
        self.connected = asyncio.Event()
        self.sessions = 0

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        backoff = self.min_backoff
        lost = False
        while not stop.is_set():
            client = AmiClient(s.host, s.port, s.username, s.secret)
            try:
                await client.connect()
            except (AmiError, ProtocolError) as exc:
                if not lost:
                    log.warning("%s; retrying with backoff up to %s s", exc,
                                s.reconnect_max_seconds)
                    lost = True
                else:
                    log.debug("AMI still unavailable: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, s.reconnect_max_seconds)
                continue
            if lost:
                metrics.AMI_RECONNECTS.inc()
                log.info("AMI link to %s is back", client.where)
            else:
                log.info("AMI connected to %s (%s)", client.where, client.banner)
            lost, backoff = False, self.min_backoff
            try:
                await self._session(client, stop)
            except (AmiError, ProtocolError) as exc:
                log.warning("AMI link lost: %s; reconnecting", exc)
                lost = True
            finally:
                self.connected.clear()
                self.meter.commands = Discard()
                await client.close()

    async def _session(self, client: AmiClient, stop: asyncio.Event) -> None:
        self.sessions += 1
        self.meter.commands = client
        resumed = await self.meter.recover()
        if resumed:
            log.info("resuming %s call(s) that were live before", resumed)
        client.send("CoreShowChannels")
        self.connected.set()
        tasks = [asyncio.create_task(self._read(client), name="ami-reader"),
                 asyncio.create_task(self._tick(), name="ami-ticker"),
                 asyncio.create_task(stop.wait(), name="ami-stop")]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for task, result in zip(tasks, results, strict=True):
            if task in done and isinstance(result, BaseException) and not isinstance(
                    result, asyncio.CancelledError):
                raise result

    async def _read(self, client: AmiClient) -> None:
        silent = 0
        while True:
            heard = client.heard
            msg = await client.read(self.ping)
            if msg is None:
                silent = 0 if client.heard != heard else silent + 1
                if silent > 1:
                    raise AmiError(f"AMI at {client.where} silent for {2 * self.ping:.0f} s")
                client.send("Ping")
                continue
            silent = 0
            name = msg.get("SystemName", "")
            # Asterisk stamps SystemName only on the events it broadcasts, not on responses,
            # list items (CoreShowChannel, ...) or FullyBooted: judge by broadcast channel events.
            broadcast = "Uniqueid" in msg and "ActionID" not in msg
            if broadcast and name != self.meter.system_name and not self._name_warned:
                self._name_warned = True
                log.warning("Asterisk at %s has systemname %r but [ami] system_name is %r: "
                            "after a restart this listener would not resume its own calls",
                            client.where, name, self.meter.system_name)
            stamp = timestamp_us(msg.get("Timestamp", ""))
            if stamp is not None:
                self.clock.seen(stamp)
            await handle_safely(self.meter, msg)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                await self.meter.tick(self.clock.now_us())
            except Exception:
                self.meter.errors += 1
                log.exception("metering tick failed")
