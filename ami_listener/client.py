"""The AMI session: panoramisk's message parser behind a small adapter of our own.

Only ``panoramisk.message.Message.from_line`` is used (it turns one message's text into
headers).  Everything around it is ours, because panoramisk's ``Manager`` and
``AMIProtocol`` have traps this adapter closes (docs/design.md, tests/test_ami_client.py):

- no user code runs in the protocol's callbacks: events go into a bounded queue that
  ``read`` drains, so a handler that raises cannot drop the connection, and an overflow
  closes the link with an AmiError (recovery then takes over) instead of losing events;
- no ``Manager``, so no task the adapter does not own: it creates none at all;
- bytes are buffered until a message is complete, then decoded, so a UTF-8 character split
  across two reads survives; lines, headers per message and the buffer are bounded;
- ``action`` awaits its answer with a time-out (a Ping that is not answered is noticed);
- a refused login raises AmiError naming the user and the server, never the secret.

It starts no tasks: the protocol callbacks only parse, queue and settle futures; the
caller reads events in its own loop (``read``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import NoReturn, cast

from panoramisk.message import Message as PanoramiskMessage

from ami_listener.protocol import MAX_HEADERS, MAX_LINE, Message, ProtocolError, action
from prepaid.errors import PrepaidError

log = logging.getLogger(__name__)

EVENT_CLASSES = "call,cdr,dialplan"  # Dial*, Bridge*, Hangup, Rename; Cdr; VarSet
QUEUE_SIZE = 20_000  # events read but not yet taken by ``read``
END = b"\r\n\r\n"  # the blank line after each message


class AmiError(PrepaidError, ConnectionError):
    """The AMI link failed: refused, closed, timed out, or the login was rejected."""


class _Parsed(PanoramiskMessage):  # type: ignore[misc]  # panoramisk has no type hints
    """What ``from_line`` parsed, kept as its plain dict (repeats as lists).

    ``from_line`` builds ``cls(headers, content)``; panoramisk's own class would copy the
    headers into a case-insensitive dict and add a ``content`` key over any real
    ``Content`` header.  Keeping the dict skips both, and the copy's cost.
    """

    def __init__(self, headers: dict[str, str | list[str]], content: str = "") -> None:
        self.headers = headers
        self.body = content  # the last line of a "Response: Follows", taken out by from_line


def parse(block: bytes) -> Message | None:
    """One complete message (without its blank line) as ours, repeated headers (a list in
    panoramisk's) in ``extra``; None if it is neither event nor response (its rule)."""
    # Not .strip(): that would cut the space of a last "Key: " and drop an empty header.
    parsed = _Parsed.from_line(block.decode("utf-8", "replace").strip("\r\n"))
    if parsed is None:
        return None
    headers = parsed.headers
    if parsed.body:  # put back where our own splitter keeps it (a header, or key "")
        key, sep, value = parsed.body.partition(": ")
        headers.setdefault(key if sep else "", value if sep else parsed.body)
    out = Message(headers)
    for key, value in headers.items():
        if type(value) is list:  # rare (ChanVariable): fix up after the fast copy
            out[key] = value[0]
            out.extra.extend((key, v) for v in value[1:])
    return out


class _Wire(asyncio.Protocol):
    """Bytes in, bounded; whole messages out to the client.  Runs in loop callbacks, so it
    only parses and hands over: it never raises and never calls user code."""

    def __init__(self, client: AmiClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.max_line = client.max_line
        self.max_headers = client.max_headers
        self.transport: asyncio.Transport | None = None
        self.banner: asyncio.Future[str] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.failed = False
        self._buf = bytearray()
        self._scanned = 0  # bytes of the buffer already searched for END
        self._tail_lines = 0  # line breaks in the buffer (an incomplete message)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return
        buf = self._buf
        buf += data
        self.client._arrived = time.monotonic()
        try:
            if not self.banner.done() and not self._read_banner():
                return
            end = buf.rfind(END, max(0, self._scanned - 3))
            if end >= 0:
                whole = bytes(buf[:end])
                del buf[:end + len(END)]
                self._scanned, self._tail_lines = 0, buf.count(b"\n")
                for block in whole.split(END):
                    self._block(block)
                    if self.failed:
                        return
            else:
                self._scanned = len(buf)
                self._tail_lines += data.count(b"\n")
            self._bound_tail()
        except (ProtocolError, AmiError) as exc:
            self.fail(exc)

    def _read_banner(self) -> bool:
        buf = self._buf
        eol = buf.find(b"\n")
        if eol < 0:
            if len(buf) > self.max_line:
                raise ProtocolError(f"AMI at {self.client.where} sent no banner line")
            return False
        self.banner.set_result(bytes(buf[:eol]).decode("utf-8", "replace").strip())
        del buf[:eol + 1]
        return True

    def _block(self, block: bytes) -> None:
        lines = block.count(b"\n") + 1
        if lines > self.max_headers:
            raise ProtocolError(f"AMI message from {self.client.where} has more than "
                                f"{self.max_headers} lines")
        # Cheap first: a block shorter than a line cannot hold a long one.
        if len(block) + 2 > self.max_line and max(
                len(line) for line in block.split(b"\n")) + 1 > self.max_line:
            raise ProtocolError(f"AMI line from {self.client.where} is longer than "
                                f"{self.max_line} bytes")
        msg = parse(block)
        if msg is not None:
            self.client._received(msg)

    def _bound_tail(self) -> None:
        """The incomplete message left in the buffer: its lines so far are bounded too."""
        buf = self._buf
        if self._tail_lines > self.max_headers:
            raise ProtocolError(f"AMI message from {self.client.where} has more than "
                                f"{self.max_headers} lines")
        if len(buf) - buf.rfind(b"\n") - 1 > self.max_line:
            raise ProtocolError(f"AMI line from {self.client.where} is longer than "
                                f"{self.max_line} bytes")

    def fail(self, exc: AmiError | ProtocolError) -> None:
        """Give up on this connection: the reason is what the client raises next."""
        if self.failed:
            return
        self.failed = True
        self._buf.clear()
        if not self.banner.done():
            self.banner.set_exception(exc)
        self.client._lost(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        where = self.client.where
        reason = (AmiError(f"AMI link to {where} broke: {exc}") if exc is not None
                  else AmiError(f"AMI at {where} closed the connection"))
        if not self.banner.done():
            self.banner.set_exception(reason)
        self.failed = True
        self.client._lost(reason)
        if not self.closed.done():
            self.closed.set_result(None)


class AmiClient:
    def __init__(self, host: str, port: int, username: str, secret: str, *,
                 events: str = EVENT_CLASSES, timeout: float = 5.0,
                 max_line: int = MAX_LINE, queue_size: int = QUEUE_SIZE) -> None:
        self.host, self.port = host, port
        self.username, self.secret = username, secret
        self.events = events
        self.timeout = timeout
        self.max_line = max_line
        self.max_headers = MAX_HEADERS
        self.banner = ""
        self._wire: _Wire | None = None
        # Events with the monotonic time they came off the socket; None wakes a reader.
        self._queue: asyncio.Queue[tuple[Message, float] | None] = asyncio.Queue(queue_size)
        self._arrived = 0.0
        self.received_at = 0.0  # when the event ``read`` returned last came off the socket
        self._ids = itertools.count(1)
        # ActionID -> (action name, the future ``action`` awaits, or None for ``send``)
        self._pending: dict[str, tuple[str, asyncio.Future[Message] | None]] = {}
        self._down: AmiError | ProtocolError | None = AmiError(
            f"AMI link to {self.where} is not connected")
        self._send_refused = False  # send() has raised for this outage already
        self.heard = 0  # messages read, responses included: a Ping's answer is a sign of life
        self.failures = 0  # sent actions answered with an error, or not sent (link down)
        self.overflows = 0  # times the event queue was full (each closed the link)

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def queued(self) -> int:
        """Events read from the socket and not yet taken by ``read``."""
        return self._queue.qsize()

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                _, wire = await loop.create_connection(lambda: _Wire(self, loop),
                                                       self.host, self.port)
                self._wire = wire
                self._down, self._send_refused = None, False
                self.banner = await wire.banner
        except (OSError, TimeoutError, ProtocolError) as exc:
            await self.close()
            raise AmiError(f"cannot connect to AMI at {self.where}: {exc or 'timed out'}"
                           ) from exc
        if not self.banner.startswith("Asterisk Call Manager"):
            await self.close()
            raise AmiError(f"{self.where} is not an Asterisk manager (said {self.banner!r})")
        try:
            msg = await self.action("Login", Username=self.username, Secret=self.secret,
                                    Events=self.events)
        except (AmiError, ProtocolError) as exc:
            await self.close()
            raise AmiError(f"AMI login as {self.username!r} at {self.where} got no answer: "
                           f"{exc}") from None
        if msg.get("Response") != "Success":
            await self.close()
            raise AmiError(f"AMI login as {self.username!r} at {self.where} refused: "
                           f"{msg.get('Message', '')}")

    # -- called by the protocol, in loop callbacks: no user code ------------------------
    def _received(self, msg: Message) -> None:
        self.heard += 1
        if "Event" in msg:
            try:
                self._queue.put_nowait((msg, self._arrived))
            except asyncio.QueueFull:
                # Dropping one event would misbill its call: give the link up instead, so
                # that the caller reconnects and recovers from Redis and Asterisk's lists.
                self.overflows += 1
                raise AmiError(f"AMI events from {self.where} came faster than they were "
                               f"handled: {self._queue.maxsize} waiting; link closed"
                               ) from None
            return
        name, future = self._pending.pop(msg.get("ActionID", ""), ("", None))
        if future is not None:
            if not future.done():
                future.set_result(msg)
        elif msg.get("Response") == "Error":
            self.failures += 1
            log.debug("AMI %s failed: %s", name or msg.get("ActionID"), msg.get("Message"))

    def _lost(self, exc: AmiError | ProtocolError) -> None:
        if self._down is None:
            self._down = exc
            log.debug("AMI link to %s down: %s", self.where, exc)
        pending, self._pending = self._pending, {}
        for _, future in pending.values():
            if future is not None and not future.done():
                future.set_exception(type(exc)(str(exc)))
        if self._queue.empty():
            self._queue.put_nowait(None)  # wakes a reader waiting in ``read``

    # -- the caller's side ---------------------------------------------------------------
    def _next_id(self) -> str:
        return f"prepaid-{next(self._ids)}"

    def _why_down(self) -> AmiError | ProtocolError | None:
        wire = self._wire
        if self._down is None and (wire is None or wire.transport is None
                                   or wire.transport.is_closing()):
            # The transport saw a write fail; connection_lost follows in a loop callback.
            return AmiError(f"AMI link to {self.where} is closing")
        return self._down

    def _write(self, name: str, headers: dict[str, str]) -> str:
        action_id = self._next_id()
        data = action(name, action_id, **headers)  # refuses a line break in a value
        assert self._wire is not None and self._wire.transport is not None
        self._wire.transport.write(data)
        return action_id

    def send(self, name: str, **headers: str) -> str:
        """Queue an action without waiting; an error answer is counted in ``failures``.

        On a link that is down the first call raises AmiError; the later ones (until the
        next ``connect``) count the action in ``failures`` and return "" so that one outage
        is logged once, not once per action.
        """
        down = self._why_down()
        if down is not None:
            if not self._send_refused:
                self._send_refused = True
                raise AmiError(f"{down}; {name} not sent")
            self.failures += 1
            log.debug("AMI link to %s is down; %s not sent", self.where, name)
            return ""
        action_id = self._write(name, headers)
        self._pending[action_id] = (name, None)
        return action_id

    async def action(self, name: str, **headers: str) -> Message:
        """Send an action and await its response (``timeout`` seconds, else AmiError).

        The response is returned as it is (``Response: Error`` included); list events an
        action triggers (``CoreShowChannel``, ...) come through ``read``.
        """
        down = self._why_down()
        if down is not None:
            raise AmiError(f"{down}; {name} not sent")
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        action_id = self._write(name, headers)
        self._pending[action_id] = (name, future)
        try:
            async with asyncio.timeout(self.timeout):
                return await future
        except TimeoutError:
            raise AmiError(f"AMI {name} to {self.where} not answered within "
                           f"{self.timeout:g} s") from None
        finally:
            self._pending.pop(action_id, None)

    def _raise_down(self) -> NoReturn:
        assert self._down is not None
        raise type(self._down)(str(self._down))

    async def read(self, idle: float) -> Message | None:
        """The next event; None after ``idle`` seconds of silence.  Events read before the
        link went down are returned first, then the reason it went down is raised."""
        if self._queue.empty():
            if self._down is not None:
                self._raise_down()
            try:
                async with asyncio.timeout(idle):
                    item = await self._queue.get()
            except TimeoutError:
                return None
        else:  # no timer to arm: under load most reads find an event waiting
            item = self._queue.get_nowait()
        if item is None:
            self._raise_down()
        msg, self.received_at = item
        return msg

    async def close(self) -> None:
        wire, self._wire = self._wire, None
        if wire is None or wire.transport is None:
            return
        wire.failed = True
        self._lost(AmiError(f"AMI link to {self.where} was closed"))
        wire.transport.close()
        try:
            async with asyncio.timeout(1.0):
                await wire.closed
        except TimeoutError:
            wire.transport.abort()
