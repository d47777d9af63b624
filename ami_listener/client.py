"""A small AMI client on asyncio streams: banner, Login, actions by ActionID, bounded reads.

It starts no tasks: the caller reads messages in its own loop (``read``), which also
settles the responses to the actions sent with ``send``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from ami_listener.protocol import MAX_LINE, Message, MessageSplitter, ProtocolError, action
from prepaid.errors import PrepaidError

log = logging.getLogger(__name__)

EVENT_CLASSES = "call,cdr,dialplan"  # Dial*, Bridge*, Hangup, Rename; Cdr; VarSet


class AmiError(PrepaidError, ConnectionError):
    """The AMI link failed: refused, closed, timed out, or the login was rejected."""


class AmiClient:
    def __init__(self, host: str, port: int, username: str, secret: str, *,
                 events: str = EVENT_CLASSES, timeout: float = 5.0,
                 max_line: int = MAX_LINE) -> None:
        self.host, self.port = host, port
        self.username, self.secret = username, secret
        self.events = events
        self.timeout = timeout
        self.max_line = max_line
        self.banner = ""
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._splitter = MessageSplitter(max_line)
        self._ids = itertools.count(1)
        self._pending: dict[str, str] = {}  # ActionID -> action name
        self.heard = 0  # messages read, responses included: a Ping's answer is a sign of life
        self.failures = 0

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    async def connect(self) -> None:
        try:
            reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=self.max_line),
                self.timeout)
            self._reader = reader
            banner = await asyncio.wait_for(reader.readline(), self.timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            await self.close()
            raise AmiError(f"cannot connect to AMI at {self.where}: {exc or 'timed out'}"
                           ) from exc
        self.banner = banner.decode("utf-8", "replace").strip()
        if not self.banner.startswith("Asterisk Call Manager"):
            await self.close()
            raise AmiError(f"{self.where} is not an Asterisk manager (said {self.banner!r})")
        login_id = self._next_id()
        self._write(action("Login", login_id, Username=self.username, Secret=self.secret,
                           Events=self.events))
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    msg = await self._read_message()
                    if msg.get("ActionID") == login_id:
                        break
        except TimeoutError:
            await self.close()
            raise AmiError(f"AMI at {self.where} did not answer the login") from None
        if msg.get("Response") != "Success":
            await self.close()
            raise AmiError(f"AMI login as {self.username!r} at {self.where} refused: "
                           f"{msg.get('Message', '')}")

    def _next_id(self) -> str:
        return f"prepaid-{next(self._ids)}"

    def _write(self, data: bytes) -> None:
        if self._writer is None or self._writer.is_closing():
            raise AmiError(f"AMI link to {self.where} is closed")
        self._writer.write(data)

    def send(self, name: str, **headers: str) -> str:
        """Queue an action; its response is checked (and a failure logged) by ``read``."""
        action_id = self._next_id()
        self._write(action(name, action_id, **headers))
        self._pending[action_id] = name
        return action_id

    async def _read_message(self) -> Message:
        assert self._reader is not None
        while True:
            try:
                raw = await self._reader.readline()
            except ValueError as exc:  # a line past the stream limit
                raise ProtocolError(f"AMI line from {self.where} too long: {exc}") from None
            except OSError as exc:
                raise AmiError(f"AMI link to {self.where} broke: {exc}") from exc
            if not raw:
                raise AmiError(f"AMI at {self.where} closed the connection")
            msg = self._splitter.line(raw)
            if msg is not None:
                self.heard += 1
                return msg

    async def read(self, idle: float) -> Message | None:
        """The next event; None after ``idle`` seconds of silence.  Responses are consumed."""
        try:
            async with asyncio.timeout(idle):
                while True:
                    msg = await self._read_message()
                    if "Event" in msg:
                        return msg
                    self._response(msg)
        except TimeoutError:
            return None

    def _response(self, msg: Message) -> None:
        name = self._pending.pop(msg.get("ActionID", ""), "")
        if msg.get("Response") == "Error":
            self.failures += 1
            log.debug("AMI %s failed: %s", name or msg.get("ActionID"), msg.get("Message"))

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (OSError, TimeoutError):
                pass
