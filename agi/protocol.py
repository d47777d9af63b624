"""The AGI wire protocol over an asyncio reader/writer, every read bounded.

Asterisk opens a session with ``agi_<name>: <value>`` lines and a blank line, then
answers each command line with ``200 result=<n> [(<data>)] [extra]``.  When the
channel hangs up, FastAGI peers get a ``HANGUP`` line and later commands get
``511``; process AGI peers get SIGHUP (see :meth:`AgiSession.mark_hangup`).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Protocol

from prepaid.errors import InputError, PrepaidError

MAX_LINE = 2048  # bytes in one header or reply line
MAX_HEADER_LINES = 128
HEADER_TIMEOUT = 5.0  # seconds for the whole header
COMMAND_TIMEOUT = 30.0  # seconds for one reply (STREAM FILE waits for the prompt to end)

_HEADER_RE = re.compile(r"^(agi_[a-z0-9_]{1,40}):(?: (.*))?$")
# A value MSet takes as it is: no ',' or '=' (its separators), quotes, spaces or '$'.
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_.+@/:-]*")
_REPLY_RE = re.compile(r"^(\d{3})(?: result=(-?\d+)(?: \((.*)\))?(?: (.*))?)?")


class AgiError(PrepaidError):
    """The AGI peer broke the protocol or went silent."""


class AgiHeaderError(AgiError, InputError):
    """The session header is malformed, too long, or never ended."""


class AgiHangup(AgiError, ConnectionError):
    """The channel hung up (HANGUP line, 511, result=-1, EOF or SIGHUP)."""


class AgiTimeout(AgiError, TimeoutError):
    """The peer did not answer a command in time."""


class Writer(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    result: int
    data: str  # the text in parentheses, or ""
    line: str


async def _readline(reader: asyncio.StreamReader, seconds: float | None) -> bytes:
    """One line, at most MAX_LINE bytes, within ``seconds`` (None: the caller bounds the
    time); b"" at EOF."""
    try:
        if seconds is None:
            line = await reader.readline()
        else:
            async with asyncio.timeout(seconds):
                line = await reader.readline()
    except (ValueError, asyncio.LimitOverrunError):
        raise AgiHeaderError(f"AGI line longer than {MAX_LINE} bytes") from None
    if len(line) > MAX_LINE:
        raise AgiHeaderError(f"AGI line longer than {MAX_LINE} bytes")
    return line


async def read_header(reader: asyncio.StreamReader, *, within: float = HEADER_TIMEOUT,
                      max_lines: int = MAX_HEADER_LINES) -> dict[str, str]:
    """The ``agi_*`` environment up to the blank line; raises AgiHeaderError on anything else."""
    env: dict[str, str] = {}
    try:
        async with asyncio.timeout(within):
            for number in range(1, max_lines + 2):
                raw = await _readline(reader, None)  # one time-out for the whole header
                if not raw:
                    raise AgiHeaderError(f"AGI peer closed the connection in header line {number}")
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                if text == "":
                    if not env:
                        raise AgiHeaderError("AGI header is empty")
                    return env
                if number > max_lines:
                    break
                m = _HEADER_RE.match(text)
                if m is None:
                    raise AgiHeaderError(f"AGI header line {number} is not 'agi_name: value': "
                                         f"{text[:60]!r}")
                env[m.group(1)] = m.group(2) or ""
    except TimeoutError:
        raise AgiHeaderError(f"AGI header not complete within {within:g} s") from None
    raise AgiHeaderError(f"AGI header longer than {max_lines} lines")


def parse_reply(line: str) -> Reply:
    m = _REPLY_RE.match(line)
    if m is None:
        raise AgiError(f"AGI reply is not '<code> result=<n>': {line[:60]!r}")
    code = int(m.group(1))
    result = int(m.group(2)) if m.group(2) is not None else 0
    return Reply(code, result, m.group(3) or "", line)


def quote(value: str) -> str:
    """An AGI argument in double quotes (values we send never hold quotes or newlines)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class AgiSession:
    """One AGI conversation: the header environment and command/reply over the stream."""

    def __init__(self, env: dict[str, str], reader: asyncio.StreamReader, writer: Writer, *,
                 command_timeout: float = COMMAND_TIMEOUT, script: str | None = None,
                 secret_slot: bool = False) -> None:
        self.env = env
        self._script = script
        # FastAGI: the first argument is [agi] secret, not the route's (see `secret`).
        self._secret_slot = secret_slot
        self.reader = reader
        self.writer = writer
        self.command_timeout = command_timeout
        self.hung_up = False
        self.sent: list[str] = []

    @property
    def script(self) -> str:
        """The route: ``authorize`` for agi://host:port/authorize or ``prepaid-agi authorize``."""
        if self._script is not None:
            return self._script
        name = self.env.get("agi_network_script") or self.env.get("agi_request", "")
        return name.split("?", 1)[0].rsplit("/", 1)[-1]

    def _all_args(self) -> list[str]:
        args = []
        for n in range(1, 100):
            value = self.env.get(f"agi_arg_{n}")
            if value is None:
                break
            args.append(value)
        return args

    @property
    def secret(self) -> str:
        """What the request passed as ``[agi] secret`` (FastAGI: its first argument)."""
        args = self._all_args()
        return args[0] if self._secret_slot and args else ""

    @property
    def args(self) -> list[str]:
        """The route's arguments: agi_arg_1.. (for process AGI without the route name, for
        FastAGI without the secret)."""
        args = self._all_args()
        if self._secret_slot:
            args = args[1:]
        if self._script is not None and args[:1] == [self._script]:
            args = args[1:]
        return args

    def mark_hangup(self) -> None:
        self.hung_up = True

    async def command(self, line: str, wait: float = 0.0) -> Reply:
        """Send one command and return its reply; raises AgiHangup once the channel is gone.
        ``wait``: seconds the command itself may take beyond ``command_timeout`` (GET DATA
        waits for a caller's keys)."""
        if self.hung_up:
            raise AgiHangup(f"channel hung up before {line.split(' ', 1)[0]}")
        self.sent.append(line)
        try:
            self.writer.write(line.encode() + b"\n")
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            self.hung_up = True
            raise AgiHangup(f"AGI connection lost sending {line!r}: {exc}") from None
        while True:
            try:
                raw = await _readline(self.reader, self.command_timeout + wait)
            except TimeoutError:
                raise AgiTimeout(f"no reply to {line!r} within "
                                 f"{self.command_timeout + wait:g} s"
                                 ) from None
            except AgiHeaderError as exc:
                raise AgiError(f"bad reply to {line!r}: {exc}") from None
            except (ConnectionError, OSError) as exc:
                self.hung_up = True
                raise AgiHangup(f"AGI connection lost waiting for {line!r}: {exc}") from None
            if not raw:
                self.hung_up = True
                raise AgiHangup(f"AGI connection closed waiting for a reply to {line!r}")
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            if text == "HANGUP":
                self.hung_up = True
                raise AgiHangup(f"channel hung up during {line!r}")
            if text == "":
                continue
            if re.match(r"^\d{3}-", text):  # multi-line usage (520-...): read to "520 End..."
                await self._skip_usage(line, text[:3])
                raise AgiError(f"AGI refused {line!r}: {text[:80]!r}")
            reply = parse_reply(text)
            if reply.code == 511 or (reply.code == 200 and reply.result == -1):
                self.hung_up = True
                raise AgiHangup(f"channel hung up: {line!r} answered {text!r}")
            if reply.code != 200:
                raise AgiError(f"AGI refused {line!r}: {text[:80]!r}")
            return reply

    async def _skip_usage(self, line: str, code: str) -> None:
        """The rest of a multi-line reply, up to its last line (``<code> ...``), so the next
        command reads its own reply; bounded like every read."""
        for _ in range(MAX_HEADER_LINES):
            try:
                raw = await _readline(self.reader, self.command_timeout)
            except (TimeoutError, AgiHeaderError, ConnectionError, OSError) as exc:
                raise AgiError(f"bad multi-line reply to {line!r}: {exc}") from None
            if not raw:
                self.hung_up = True
                raise AgiHangup(f"AGI connection closed in the reply to {line!r}")
            if raw.decode("utf-8", "replace").startswith(code + " "):
                return
        raise AgiError(f"multi-line reply to {line!r} longer than {MAX_HEADER_LINES} lines")

    # -- the commands the routes use ----------------------------------------------
    async def set_variable(self, name: str, value: str) -> None:
        await self.command(f"SET VARIABLE {name} {quote(value)}")

    async def set_variables(self, values: dict[str, str]) -> None:
        """Several variables in one round trip (``EXEC MSet``, as the dialplan's
        ``MSet(a=1,b=2)``): each command waits for Asterisk's channel thread, which is what
        a loaded PBX is short of. A value MSet would split goes by SET VARIABLE."""
        plain = {k: v for k, v in values.items() if _PLAIN_VALUE.fullmatch(v)}
        if plain:
            pairs = ",".join(f"{k}={v}" for k, v in plain.items())
            if (await self.command(f"EXEC MSet {pairs}")).result == -2:  # no such application
                plain = {}
        for name, value in values.items():
            if name not in plain:
                await self.set_variable(name, value)

    async def get_variable(self, name: str) -> str | None:
        reply = await self.command(f"GET VARIABLE {name}")
        return reply.data if reply.result == 1 else None

    async def get_full_variable(self, expression: str) -> str:
        """``expression`` with the channel's variables and functions substituted, as the
        dialplan would (``${CHANNEL(linkedid)}/${PREPAID_ACCOUNT}``): several values in
        one round trip; unset ones are empty."""
        reply = await self.command(f"GET FULL VARIABLE {quote(expression)}")
        return reply.data if reply.result == 1 else ""

    async def answer(self) -> None:
        await self.command("ANSWER")

    async def stream_file(self, name: str) -> None:
        await self.command(f'STREAM FILE {name} ""')

    async def say_number(self, number: int) -> None:
        await self.command(f'SAY NUMBER {number} ""')

    async def hangup(self) -> None:
        await self.command("HANGUP")
