"""FastAGI server on asyncio.start_server: one owned task per connection, every read bounded.

Used from the dialplan as ``AGI(agi://127.0.0.1:4573/authorize)``.  A peer that sends
garbage, a huge header or disconnects mid-header is logged and closed; the server keeps
serving.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from agi.protocol import (
    MAX_LINE,
    AgiHeaderError,
    AgiSession,
    read_header,
)
from agi.routes import dispatch, new_outage_log
from prepaid.outage import OutageLog
from prepaid.store import Store

log = logging.getLogger(__name__)


class AgiServer:
    """Listens on ``[agi] listen``; ``port=0`` picks a free port (see :attr:`port`)."""

    def __init__(self, store: Store, *, host: str | None = None, port: int | None = None,
                 header_timeout: float | None = None,
                 command_timeout: float | None = None,
                 max_connections: int | None = None) -> None:
        agi = store.settings.agi
        self.store = store
        self.host = agi.host if host is None else host
        self.requested_port = agi.port if port is None else port
        self.header_timeout = agi.header_timeout if header_timeout is None else header_timeout
        self.command_timeout = agi.command_timeout if command_timeout is None else command_timeout
        self.max_connections = agi.max_connections if max_connections is None else max_connections
        self.allow = tuple(ipaddress.ip_network(a, strict=False) for a in agi.allow)
        self.outage: OutageLog = new_outage_log()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.served = 0
        self.rejected = 0

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self.requested_port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.requested_port,
                                                  limit=MAX_LINE)
        log.info("FastAGI listening on %s:%s", self.host, self.port)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._connection(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("AGI connection task failed", exc_info=task.exception())

    def _allowed(self, peer: object) -> bool:
        if not self.allow:
            return True
        try:
            address = ipaddress.ip_address(peer[0])  # type: ignore[index]
        except (TypeError, ValueError, IndexError):
            return False
        return any(address in net for net in self.allow)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            if len(self._tasks) > self.max_connections:
                self.rejected += 1
                log.warning("AGI connection from %s refused: %s connections open", peer,
                            self.max_connections)
                return
            if not self._allowed(peer):
                self.rejected += 1
                log.warning("AGI connection from %s refused: not in [agi] allow", peer)
                return
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
            session = AgiSession(env, reader, writer, command_timeout=self.command_timeout)
            await dispatch(session, self.store, self.outage)
            self.served += 1
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def close(self, grace: float = 5.0) -> None:
        """Stop listening, let open sessions finish for ``grace`` s, cancel the rest."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        log.info("FastAGI server stopped")


async def run(store: Store, stop: asyncio.Event) -> None:
    """Run the FastAGI server until ``stop`` is set (called by ``prepaid serve``)."""
    server = AgiServer(store)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.close()
