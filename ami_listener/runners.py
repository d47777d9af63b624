"""Runners feed the one meter: live from an AMI connection, or from a raw recording.

The live runner reconnects with backoff (logging the loss once and the return once), and
after every (re)connect resumes the calls Redis holds as live and lists the channels still
up.  The reader never stops reading: it only stamps each event with the time it was read
and puts it in a bounded queue, and the metering task (recovery, ledger calls, logging)
works through that queue beside it, so Asterisk never waits on us to write (it drops a
manager session whose writes block past the user's ``writetimeout``).  The runner owns its
tasks (reader, meter, ticker) and cancels and awaits them on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from pathlib import Path

from ami_listener.client import AmiClient, AmiError
from ami_listener.meter import Discard, Meter, OnceCommands
from ami_listener.protocol import Message, ProtocolError, split, timestamp_us
from ami_listener.tracker import US
from prepaid import health, metrics
from prepaid.config import AmiSettings
from prepaid.errors import StoreUnavailable
from prepaid.outage import OutageLog

log = logging.getLogger(__name__)

TICK_SECONDS = 0.25
PING_SECONDS = 20.0
CLOCK_WAIT_SECONDS = 1.0


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


# An event and its time (us, Asterisk's): its Timestamp, else when it was read; None for
# the answers to our own actions (list items), which say nothing about time.
Queued = tuple[Message, int | None, float]  # the event, its time (us), when it was read


async def handle_safely(meter: Meter, msg: Message, received_us: int | None = None) -> None:
    """A bug in handling one event is logged; it never ends the loop."""
    try:
        await meter.handle(msg, received_us)
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
        self.queue: asyncio.Queue[Queued] | None = None
        self._behind_logged = False
        self._clock_known = asyncio.Event()
        self.stamped: bool | None = None  # whether this session's events carry Timestamps
        self._tried = False
        self._ending = False
        # The most metering trailed Asterisk since the last heartbeat, in seconds: an event
        # metered this long after it was read, or a tick that started this late.
        self.lag = 0.0
        self._lag_logged = False

    def _trailed(self, seconds: float) -> None:
        self.lag = max(self.lag, seconds)

    def state(self) -> str | None:
        """What the heartbeat tells authorization: up, behind (the queue is half full, or
        metering trailed by more than [ami] behind_seconds since the last beat: a call
        allowed now would be metered late) or down (no AMI session); None before the first
        connection attempt has ended."""
        if self.connected.is_set():
            queue = self.queue
            if queue is not None and queue.qsize() > queue.maxsize // 2:
                return "behind"
            if self.lag > self.settings.behind_seconds:
                if not self._lag_logged:
                    self._lag_logged = True
                    log.warning("metering trails the AMI link by %.1f s ([ami] behind_seconds "
                                "%g): new calls are refused until it catches up", self.lag,
                                self.settings.behind_seconds)
                return "behind"
            if self._lag_logged:
                self._lag_logged = False
                log.info("metering has caught up with the AMI link")
            return "up"
        return "down" if self._tried else None

    async def beat(self, stop: asyncio.Event, every: float = 1.0) -> None:
        """The metering heartbeat ([agi] refuses new calls without it): its own task, never
        in front of the AMI read path; a Redis outage is logged once."""
        outage = OutageLog(log, "Redis (metering heartbeat)")
        while not stop.is_set():
            state = self.state()
            self.lag = 0.0  # each beat judges what happened since the one before
            if state is not None:
                try:
                    await health.beat(self.meter.redis, self.meter.prefix,
                                      self.meter.system_name, state=state,
                                      backlog=self.backlog)
                    outage.success()
                except StoreUnavailable as exc:
                    outage.failure(exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)

    async def run(self, stop: asyncio.Event) -> None:
        beating = asyncio.create_task(self.beat(stop), name="ami-heartbeat")
        try:
            await self._run(stop)
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating

    async def _run(self, stop: asyncio.Event) -> None:
        s = self.settings
        backoff = self.min_backoff
        lost = False
        while not stop.is_set():
            client = AmiClient(s.host, s.port, s.username, s.secret, queue_size=s.queue_size)
            try:
                await client.connect()
            except (AmiError, ProtocolError) as exc:
                self._tried = True
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
                lost = self._tried = True
            finally:
                self.connected.clear()
                self.queue = None
                self.meter.commands = Discard()
                await client.close()

    async def _session(self, client: AmiClient, stop: asyncio.Event) -> None:
        self.sessions += 1
        self.meter.commands = OnceCommands(client)
        queue: asyncio.Queue[Queued] = asyncio.Queue(self.settings.queue_size)
        self.queue = queue
        self.connected.set()
        recovered = asyncio.Event()
        self._clock_known = asyncio.Event()
        self.stamped = None
        tasks = [asyncio.create_task(self._read(client, queue), name="ami-reader"),
                 asyncio.create_task(self._meter(queue, recovered), name="ami-meter"),
                 asyncio.create_task(self._tick(recovered), name="ami-ticker"),
                 asyncio.create_task(self._reap(recovered), name="ami-reaper"),
                 asyncio.create_task(stop.wait(), name="ami-stop")]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._ending = True  # a cancellation swallowed below still ends the meter loop
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            self._ending = False
        for task, result in zip(tasks, results, strict=True):
            if task in done and isinstance(result, BaseException) and not isinstance(
                    result, asyncio.CancelledError):
                raise result

    async def _meter(self, queue: asyncio.Queue[Queued], recovered: asyncio.Event) -> None:
        """Recovery first (events read meanwhile wait in the queue, in order), then every
        event in the order it was read."""
        resumed = await self.meter.recover()
        if resumed:
            log.info("resuming %s call(s) that were live before", resumed)
        self.meter.commands.send("CoreShowChannels")
        recovered.set()
        while not self._ending:
            msg, received, read_at = await queue.get()
            self._trailed(time.monotonic() - read_at)
            await handle_safely(self.meter, msg, received)
            if self._behind_logged and queue.qsize() < queue.maxsize // 2:
                self._behind_logged = False
                log.info("metering has caught up with the AMI link")

    async def _read(self, client: AmiClient, queue: asyncio.Queue[Queued]) -> None:
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
            if queue.full() and not self._behind_logged:
                self._behind_logged = True
                log.warning("metering is %s events behind the AMI link; new calls are "
                            "refused until it catches up", queue.qsize())
            if "Uniqueid" in msg and "ActionID" not in msg and self.stamped is None:
                # The first channel event tells whether Asterisk stamps them (FullyBooted
                # never carries a Timestamp, even with timestampevents).
                self.stamped = stamp is not None
                self._clock_known.set()
                if not self.stamped:
                    log.info("AMI events carry no Timestamp (timestampevents = no): metering "
                             "uses the time it reads them; charges still follow the CDR")
            if stamp is None and self.stamped is False and "ActionID" not in msg:
                stamp = self.clock.now_us()  # the time it was read
            await queue.put((msg, stamp, time.monotonic()))

    @property
    def backlog(self) -> int:
        """Events read but not yet metered (0 between sessions)."""
        queue = self.queue
        return queue.qsize() if queue is not None else 0

    async def _reap(self, recovered: asyncio.Event) -> None:
        """Every [ami] reap_seconds, once the live calls are known: orphaned holds back."""
        await recovered.wait()
        while True:
            await asyncio.sleep(self.settings.reap_seconds)
            try:
                await self.meter.reap()
            except Exception:
                self.meter.errors += 1
                log.exception("reaping orphaned holds failed")

    async def _tick(self, recovered: asyncio.Event) -> None:
        # The resumed calls first, and Asterisk's clock if it stamps its events.
        await recovered.wait()
        with contextlib.suppress(TimeoutError):  # an idle PBX sends no channel event
            await asyncio.wait_for(self._clock_known.wait(), CLOCK_WAIT_SECONDS)
        began = time.monotonic()
        while not self._ending:  # a cancellation swallowed below still ends the loop
            await asyncio.sleep(self.tick)
            # Late when the loop is starved or the last tick's ledger calls took long.
            now = time.monotonic()
            self._trailed(now - began - self.tick)
            began = now
            try:
                await self.meter.tick(self.clock.now_us())
            except Exception:
                self.meter.errors += 1
                log.exception("metering tick failed")
