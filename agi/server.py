"""FastAGI server on asyncio.start_server: one owned task per connection, every read bounded.

Used from the dialplan as ``AGI(agi://127.0.0.1:4573/authorize)``.  A peer that sends
garbage, a huge header or disconnects mid-header is logged and closed; the server keeps
serving.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import socket
import time
from collections.abc import Sequence

from agi.protocol import (
    MAX_LINE,
    AgiHeaderError,
    AgiSession,
    read_header,
)
from agi.routes import RouteContext, dispatch, new_context
from prepaid import metrics
from prepaid.config import AgiSettings
from prepaid.errors import ConfigError, ServeError
from prepaid.listen import listening
from prepaid.outage import OutageLog
from prepaid.store import Store

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allow(entries: Sequence[str]) -> tuple[Network, ...]:
    """``[agi] allow`` as networks; a bad entry is a ConfigError naming it."""
    out = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"[agi] allow entry {entry!r} is not an address or network "
                              "like 127.0.0.1 or 10.0.0.0/8") from None
    return tuple(out)


def bind(agi: AgiSettings) -> list[socket.socket]:
    """Listening sockets for ``[agi] listen`` (prepaid.listen); a taken port is a
    ServeError with one clear line."""
    return listening(agi.host, agi.port, what=f"FastAGI on [agi] listen {agi.listen!r}",
                     backlog=1024)


class RefusedLog:
    """A flood of refused requests logged once: the first at WARNING, repeats at DEBUG, and
    one summary at INFO when a good request comes again."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.refused = 0  # in this spell
        self.peers: set[str] = set()

    def refuse(self, peer: str) -> None:
        if not self.refused:
            log.warning("AGI request from %s refused: %s (further ones are counted in "
                        "prepaid_agi_refused_total and logged at DEBUG)", peer, self.what)
        else:
            log.debug("AGI request from %s refused: %s", peer, self.what)
        self.refused += 1
        if len(self.peers) < 10:
            self.peers.add(peer)

    def good(self) -> None:
        if self.refused:
            log.info("AGI requests accepted again; %s refused meanwhile (%s) from %s",
                     self.refused, self.what, ", ".join(sorted(self.peers)))
            self.refused = 0
            self.peers.clear()


def secret_ok(given: str, secret: str) -> bool:
    """The request passed ``[agi] secret`` (compared in constant time)."""
    return hmac.compare_digest(given.encode(), secret.encode())


def warn_callerid(agi: AgiSettings) -> None:
    """Caller ID is whatever the caller sends (a SIP From header): as an account source it
    lets a caller choose who pays."""
    if "callerid" in agi.account_sources:
        log.warning("[agi] account_sources holds \"callerid\": a caller who sets their own "
                    "caller ID (a SIP From header) chooses the paying account; set the "
                    "accountcode per endpoint and use [\"variable\", \"accountcode\"]")


def _peer_text(peer: object) -> str:
    try:
        return f"{peer[0]}:{peer[1]}"  # type: ignore[index]
    except (TypeError, IndexError):
        return str(peer)


class AgiServer:
    """Listens on ``[agi] listen``; ``port=0`` picks a free port (see :attr:`port`); or on
    ``socks`` already listening (from :func:`bind`)."""

    def __init__(self, store: Store, *, host: str | None = None, port: int | None = None,
                 header_timeout: float | None = None,
                 command_timeout: float | None = None,
                 max_connections: int | None = None,
                 socks: Sequence[socket.socket] = ()) -> None:
        agi = store.settings.agi
        self.store = store
        self.host = agi.host if host is None else host
        self.requested_port = agi.port if port is None else port
        self.header_timeout = agi.header_timeout if header_timeout is None else header_timeout
        self.command_timeout = agi.command_timeout if command_timeout is None else command_timeout
        self.max_connections = agi.max_connections if max_connections is None else max_connections
        self.max_per_client = agi.max_connections_per_client
        self._per_client: dict[str, int] = {}  # open connections by peer address
        self.crowded = RefusedLog(f"more than [agi] max_connections_per_client "
                                  f"({self.max_per_client}) open from its address")
        self.allow = parse_allow(agi.allow)
        # Started now: a missing metering heartbeat counts only after [agi]
        # metering_stale_seconds, while the listener beside this server logs in.
        self.context: RouteContext = new_context(store, watching_since=time.monotonic())
        self.socks = list(socks)
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        self.served = 0
        self.rejected = 0
        self.bad_secret = RefusedLog("without [agi] secret as its first argument, or a "
                                     "wrong one")

    @property
    def outage(self) -> OutageLog:
        return self.context.outage

    @property
    def port(self) -> int:
        sockets = [s for server in self._servers for s in server.sockets]
        if not sockets:
            return self.requested_port
        return int(sockets[0].getsockname()[1])

    async def start(self) -> None:
        if self.socks:
            self._servers = [await asyncio.start_server(self._accept, sock=sock, limit=MAX_LINE)
                             for sock in self.socks]
        else:
            try:
                self._servers = [await asyncio.start_server(
                    self._accept, self.host, self.requested_port, limit=MAX_LINE)]
            except OSError as exc:
                raise ServeError(f"cannot listen for FastAGI on {self.host}:"
                                 f"{self.requested_port}: {(exc.strerror or str(exc)).lower()}"
                                 ) from None
        self._watch = asyncio.get_running_loop().create_task(self._watch_loop(),
                                                             name="agi-loop-watch")
        log.info("FastAGI listening on %s:%s", self.host, self.port)
        warn_callerid(self.store.settings.agi)

    async def _watch_loop(self, every: float = 0.1) -> None:
        """How late this loop runs, decaying over about a second: the routes tell a server
        short of CPU from a Redis that does not answer."""
        ctx = self.context
        while True:
            began = time.monotonic()
            await asyncio.sleep(every)
            late = time.monotonic() - began - every
            ctx.loop_late = max(late, ctx.loop_late * 0.8)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._connection(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("AGI connection task failed", exc_info=task.exception())

    def _allowed(self, peer: object) -> bool:
        try:
            address = ipaddress.ip_address(peer[0])  # type: ignore[index]
        except (TypeError, ValueError, IndexError):
            return False
        return any(address in net for net in self.allow)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        address = _peer_text(peer).rsplit(":", 1)[0]
        self._per_client[address] = self._per_client.get(address, 0) + 1
        try:
            if len(self._tasks) > self.max_connections:
                self.rejected += 1
                metrics.AGI_REFUSED.labels("connections").inc()
                log.warning("AGI connection from %s refused: %s connections open", peer,
                            self.max_connections)
                return
            if not self._allowed(peer):
                self.rejected += 1
                metrics.AGI_REFUSED.labels("allow").inc()
                log.warning("AGI connection from %s refused: not in [agi] allow", peer)
                return
            if self._per_client[address] > self.max_per_client:
                self.rejected += 1
                metrics.AGI_REFUSED.labels("per_client").inc()
                self.crowded.refuse(_peer_text(peer))
                return
            self.crowded.good()
            try:
                env = await read_header(reader, within=self.header_timeout)
            except AgiHeaderError as exc:
                self.rejected += 1
                log.warning("AGI connection from %s dropped: %s", peer, exc)
                return
            except (ConnectionError, OSError) as exc:
                self.rejected += 1
                log.warning("AGI connection from %s lost in header: %s", peer, exc)
                return
            session = AgiSession(env, reader, writer, command_timeout=self.command_timeout,
                                 secret_slot=True)
            secret = self.store.settings.agi.secret
            if secret and not secret_ok(session.secret, secret):
                # Before any AGI command or Redis step: a stranger learns nothing.
                self.rejected += 1
                metrics.AGI_REFUSED.labels("secret").inc()
                self.bad_secret.refuse(_peer_text(peer))
                return
            self.bad_secret.good()
            await dispatch(session, self.store, self.context)
            self.served += 1
        finally:
            left = self._per_client[address] - 1
            if left:
                self._per_client[address] = left
            else:
                del self._per_client[address]
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def close(self, grace: float = 5.0) -> None:
        """Stop listening, let open sessions finish for ``grace`` s, cancel the rest."""
        for server in self._servers:
            server.close()
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.context.drain()  # outcomes still being logged (each bounded by a time-out)
        for server in self._servers:
            await server.wait_closed()
        self._servers = []
        log.info("FastAGI server stopped")


async def run(store: Store, stop: asyncio.Event, *,
              socks: Sequence[socket.socket] = ()) -> None:
    """Run the FastAGI server until ``stop`` is set (called by ``prepaid serve``, with the
    sockets it bound; closed when the server stops)."""
    server = AgiServer(store, socks=socks)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.close()
