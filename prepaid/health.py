"""Metering health: the AMI listener's heartbeat, the reader authorization asks, ``status``.

The listener of each Asterisk beats about once a second into one Redis hash,
``<prefix>:meter:<system_name or '->``: ``state`` (``up``: logged in and keeping up,
``behind``: its event queue is filling, ``down``: AMI unreachable or login refused),
``backlog`` (events read, not yet metered) and ``at``. The key expires, so a listener that
died leaves nothing behind for long.

Times are Redis' own clock (``TIME`` inside the scripts), not the hosts': the listener and an
AGI on another host compare ages without trusting each other's clocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prepaid import keys, lua, metrics
from prepaid.config import Settings
from prepaid.errors import StoreUnavailable
from prepaid.outage import OutageLog
from prepaid.redis_client import REDIS_ERRORS, RedisClient, text

log = logging.getLogger(__name__)

STATES = ("up", "behind", "down")
MISSING = "missing"  # no key: the listener never beat, or not for longer than its TTL


def meter_key(prefix: str, system_name: str) -> str:
    return keys.meter(prefix, system_name)


async def beat(redis: RedisClient, prefix: str, system_name: str, *, state: str, backlog: int,
               ttl: float = 10.0) -> None:
    """Write this listener's heartbeat (raises StoreUnavailable when Redis is away)."""
    if state not in STATES:
        raise ValueError(f"metering state {state!r} is not one of {', '.join(STATES)}")
    try:
        await redis.register_script(lua.METER_BEAT)(
            keys=[meter_key(prefix, system_name)],
            args=[state, str(max(0, backlog)), str(max(1, int(ttl * 1000)))])
    except REDIS_ERRORS as exc:
        raise StoreUnavailable(f"Redis is unavailable writing the metering heartbeat: {exc}"
                               ) from exc


class Heartbeat:
    """Beats every ``every`` s what ``status()`` says (state, backlog) until ``stop``.

    For the listener: a Redis outage is logged once (the listener logs its own outage of
    metering), and a beat is never in front of the AMI read path: it is its own task."""

    def __init__(self, redis: RedisClient, prefix: str, system_name: str,
                 status: Callable[[], tuple[str, int]], *, every: float = 1.0,
                 ttl: float = 10.0) -> None:
        self.redis, self.prefix, self.system_name = redis, prefix, system_name
        self.status, self.every, self.ttl = status, every, ttl
        self.outage = OutageLog(log, "Redis (metering heartbeat)")

    async def once(self) -> None:
        state, backlog = self.status()
        try:
            await beat(self.redis, self.prefix, self.system_name, state=state,
                       backlog=backlog, ttl=self.ttl)
            self.outage.success()
        except StoreUnavailable as exc:
            self.outage.failure(exc)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.once()
            try:
                await asyncio.wait_for(stop.wait(), self.every)
            except TimeoutError:
                pass


@dataclass(frozen=True, slots=True)
class MeterBeat:
    """One server's last heartbeat as Redis holds it now."""

    system_name: str
    state: str  # up, behind, down, or MISSING
    backlog: int = 0
    at: float = 0.0  # epoch seconds of the beat, Redis' clock (0 when missing)
    age: float = 0.0  # seconds since the beat, Redis' clock (0 when missing)

    @property
    def key_present(self) -> bool:
        return self.state != MISSING


def _parse(system_name: str, reply: Any) -> MeterBeat:
    now = int(reply[0]) + int(reply[1]) / 1e6
    flat = [text(x) for x in reply[2]]
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    if not fields:
        return MeterBeat(system_name, MISSING)
    try:
        at = float(fields.get("at", "0"))
        backlog = int(fields.get("backlog", "0"))
    except ValueError:
        at, backlog = 0.0, 0
    state = fields.get("state", "")
    if state not in STATES:
        state = "down"  # unreadable: never taken for 'up'
    return MeterBeat(system_name, state, backlog, at, max(0.0, now - at))


async def read_beat(redis: RedisClient, prefix: str, system_name: str) -> MeterBeat:
    """One round trip: the hash and Redis' time. Raises StoreUnavailable."""
    try:
        reply = await redis.register_script(lua.METER_READ)(keys=[meter_key(prefix, system_name)])
    except REDIS_ERRORS as exc:
        raise StoreUnavailable(f"Redis is unavailable reading the metering heartbeat: {exc}"
                               ) from exc
    return _parse(system_name, reply)


async def read_all(redis: RedisClient, prefix: str, also: str | None = None) -> list[MeterBeat]:
    """Every server's heartbeat (a SCAN; for ``status`` and the gauges, not for calls), plus
    ``also`` (this config's server) even when it has none."""
    head = keys.meter_head(prefix)
    try:
        names = {text(k)[len(head):] async for k in redis.scan_iter(match=f"{head}*",
                                                                     count=1000)}
    except REDIS_ERRORS as exc:
        raise StoreUnavailable(f"Redis is unavailable listing metering heartbeats: {exc}"
                               ) from exc
    names = {"" if n == "-" else n for n in names}
    if also is not None:
        names.add(also)
    return [await read_beat(redis, prefix, n) for n in sorted(names)]


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    why: str  # what was seen, for logs and ``status``


def judge(beat_: MeterBeat, stale_seconds: float, *, missing_for: float) -> Verdict:
    """Metering is OK on a fresh 'up' beat. 'behind' and 'down' count at once; an old beat,
    or none, only once it is older than ``stale_seconds`` (``missing_for``: how long the
    reader has seen no good beat), so a short listener restart refuses no call."""
    if beat_.state == MISSING:
        if missing_for <= stale_seconds:
            return Verdict(True, f"no heartbeat yet ({missing_for:.1f} s)")
        if missing_for == float("inf"):
            return Verdict(False, "no heartbeat")
        return Verdict(False, f"no heartbeat for {missing_for:.1f} s")
    if beat_.state == "behind":
        return Verdict(False, f"metering is behind ({beat_.backlog} events waiting)")
    if beat_.state == "down":
        return Verdict(False, "the listener has no AMI session (AMI unreachable or login "
                              "refused)")
    if beat_.age > stale_seconds:
        return Verdict(False, f"last heartbeat {beat_.age:.1f} s ago")
    return Verdict(True, f"up, backlog {beat_.backlog}, beat {beat_.age:.1f} s ago")


class MeteringGate:
    """What authorization asks before each call: is this server's metering OK?

    One answer is shared for ``cache_seconds`` by every call (and one read is in flight at a
    time), so under load it costs no Redis round trip per call. ``watching_since`` is when a
    missing beat starts to count: the FastAGI server's start (its listener beside it may still
    be logging in); None for the process AGI, which lives for one call, so a missing beat
    counts at once (the key outlives a short listener restart: its TTL is 10 s)."""

    def __init__(self, redis: RedisClient, prefix: str, system_name: str, stale_seconds: float,
                 *, allow_unmetered: bool = False, cache_seconds: float = 0.5,
                 watching_since: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis, self.prefix, self.system_name = redis, prefix, system_name
        self.stale_seconds = stale_seconds
        self.allow_unmetered = allow_unmetered
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._last_good = watching_since if watching_since is not None else -float("inf")
        self._cached: tuple[float, Verdict] | None = None
        self._inflight: asyncio.Task[Verdict] | None = None
        self._ok: bool | None = None  # the last state logged

    @classmethod
    def for_settings(cls, redis: RedisClient, settings: Settings, *,
                     watching_since: float | None) -> MeteringGate:
        return cls(redis, settings.redis.key_prefix, settings.ami.system_name,
                   settings.agi.metering_stale_seconds,
                   allow_unmetered=settings.agi.allow_unmetered, watching_since=watching_since)

    @property
    def server(self) -> str:
        return repr(self.system_name) if self.system_name else "(no [ami] system_name)"

    async def check(self) -> Verdict:
        """The current verdict; raises StoreUnavailable (the caller's Redis outage path)."""
        now = self.clock()
        if self._cached is not None and now - self._cached[0] < self.cache_seconds:
            return self._cached[1]
        if self._inflight is None:
            self._inflight = asyncio.get_running_loop().create_task(self._read())
            self._inflight.add_done_callback(self._read_done)
        # Shielded: one caller's timeout must not cancel the read the others wait for.
        return await asyncio.shield(self._inflight)

    def _read_done(self, task: asyncio.Task[Verdict]) -> None:
        self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved: a caller may have stopped waiting

    async def _read(self) -> Verdict:
        beat_ = await read_beat(self.redis, self.prefix, self.system_name)
        now = self.clock()
        if beat_.state == "up" and beat_.age <= self.stale_seconds:
            # The beat's own time, not this read's: a key read right after a restart with an
            # old 'at' must not count as fresh once it expires.
            self._last_good = max(self._last_good, now - beat_.age)
        verdict = judge(beat_, self.stale_seconds, missing_for=now - self._last_good)
        self._cached = (now, verdict)
        self._log_change(verdict)
        return verdict

    def _log_change(self, verdict: Verdict) -> None:
        if verdict.ok == self._ok:
            if not verdict.ok:
                log.debug("metering of server %s still away: %s", self.server, verdict.why)
            return
        first = self._ok is None
        self._ok = verdict.ok
        if verdict.ok:
            if not first:
                log.info("metering of server %s is back (%s); calls are billed again",
                         self.server, verdict.why)
        elif self.allow_unmetered:
            log.warning("metering of server %s is away: %s; calls are allowed UNBILLED "
                        "([agi] allow_unmetered = true)", self.server, verdict.why)
        else:
            log.error("metering of server %s is away: %s; new calls are refused "
                      "(ERROR NO_METERING)", self.server, verdict.why)


# -- prepaid status and the gauges ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Check:
    name: str
    state: str  # up, down, unknown, sandbox (the gateway); none, waiting (dead letters)
    detail: str = ""
    ok: bool = True  # counted by ``status``'s exit code


@dataclass(frozen=True, slots=True)
class Report:
    redis: Check
    meters: tuple[tuple[MeterBeat, Verdict], ...]
    others: tuple[Check, ...]
    this_server: str

    @property
    def ok(self) -> bool:
        """Calls can be authorized and billed here: Redis answers and this server's
        metering is OK."""
        mine = [v for b, v in self.meters if b.system_name == self.this_server]
        return self.redis.ok and all(v.ok for v in mine)


async def redis_check(redis: RedisClient, safe_url: str) -> Check:
    began = time.perf_counter()
    try:
        await redis.ping()
    except REDIS_ERRORS as exc:
        return Check("redis", "down", f"{safe_url}: {exc}", ok=False)
    return Check("redis", "up", f"{safe_url}, ping {(time.perf_counter() - began) * 1000:.1f} ms")


async def smtp_check(host: str, port: int, within: float) -> Check:
    """Connect and read the greeting, nothing more (for ``status``, not a periodic probe)."""
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                greeting = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError) as exc:
        return Check("smtp", "down", f"{host}:{port}: {exc or 'no answer'}", ok=True)
    text = greeting.decode(errors="replace").strip()
    if not text.startswith("220"):
        return Check("smtp", "down", f"{host}:{port}: greeted {text[:60]!r}", ok=True)
    return Check("smtp", "up", f"{host}:{port}")


async def dead_letters_check(redis: RedisClient, prefix: str) -> Check:
    """How many events are parked (prepaid/deadletters.py): each one's action waits for the
    admin. Not counted in the exit code: calls are not touched."""
    try:
        waiting = int(await redis.xlen(keys.dead_letters(prefix)))
    except REDIS_ERRORS as exc:
        return Check("dead_letters", "unknown", str(exc))
    metrics.DEAD_LETTERS_WAITING.set(waiting)
    if not waiting:
        return Check("dead_letters", "none")
    return Check("dead_letters", "waiting", f"{waiting} event(s) parked after failing; see "
                 "'prepaid dead-letters'")


async def report(redis: RedisClient, settings: Settings, *, everything: bool = True) -> Report:
    """Redis and this server's metering; with ``everything`` (``prepaid status``) also every
    other server's metering (a SCAN) and SMTP (a connection): not for a periodic gauge."""
    prefix, mine = settings.redis.key_prefix, settings.ami.system_name
    stale = settings.agi.metering_stale_seconds
    redis_state = await redis_check(redis, settings.redis.safe_url)
    meters: list[tuple[MeterBeat, Verdict]] = []
    if redis_state.ok:
        try:
            beats = (await read_all(redis, prefix, also=mine) if everything
                     else [await read_beat(redis, prefix, mine)])
        except StoreUnavailable as exc:
            redis_state, beats = Check("redis", "down", str(exc), ok=False), []
        # No grace here: a reader that just started has seen no good beat.
        meters = [(b, judge(b, stale, missing_for=float("inf"))) for b in beats]
    others: list[Check] = []
    if redis_state.ok:
        others.append(await dead_letters_check(redis, prefix))
    if everything:
        smtp = settings.smtp
        others.append(await smtp_check(smtp.host, smtp.port, min(2.0, smtp.timeout)))
    gateway = settings.payments.gateway
    others.append(Check("gateway", "sandbox" if gateway == "sandbox" else "unknown",
                        "no provider" if gateway == "sandbox" else f"{gateway}: not measured"))
    return Report(redis_state, tuple(meters), tuple(others), mine)


def export(rep: Report) -> None:
    """Set the health gauges from a report."""
    metrics.DEPENDENCY_UP.labels("redis").set(1 if rep.redis.ok else 0)
    for check in rep.others:
        if check.state in ("up", "down"):
            metrics.DEPENDENCY_UP.labels(check.name).set(1 if check.state == "up" else 0)
    for b, verdict in rep.meters:
        name = b.system_name or "-"
        for state in (*STATES, MISSING):
            metrics.METERING_STATE.labels(name, state).set(1 if b.state == state else 0)
        metrics.METERING_BACKLOG.labels(name).set(b.backlog)
        metrics.METERING_BEAT_AGE.labels(name).set(b.age)
        if b.system_name == rep.this_server:
            metrics.DEPENDENCY_UP.labels("metering").set(1 if verdict.ok else 0)


async def export_forever(redis: RedisClient, settings: Settings, stop: asyncio.Event, *,
                         every: float = 2.0) -> None:
    """Refresh the health gauges every ``every`` s until ``stop`` (``prepaid serve``)."""
    while not stop.is_set():
        try:
            export(await report(redis, settings, everything=False))
        except Exception:  # a gauge refresh must never stop serve
            log.exception("refreshing the health gauges failed")
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass
