"""The AMI wire format: ``Key: Value`` lines ending in CRLF, a blank line after each message.

Pure: splitting bytes into messages, building actions, parsing timestamps.  A message is a
``Message`` (a dict of the first value of each header, with repeated headers such as
``ChanVariable`` kept in ``Message.extra``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prepaid.errors import InputError

MAX_LINE = 8192  # bytes in one line
MAX_HEADERS = 256  # lines in one message


class ProtocolError(InputError):
    """The peer sent something that is not AMI (too long, too many lines, no banner)."""


class Message(dict[str, str]):
    """One AMI message: headers by name (first value wins), repeats in ``extra``."""

    __slots__ = ("extra",)

    def __init__(self, *args: object, **kwargs: str) -> None:
        super().__init__(*args, **kwargs)
        self.extra: list[tuple[str, str]] = []

    @property
    def event(self) -> str:
        return self.get("Event", "")

    def variables(self) -> dict[str, str]:
        """``ChanVariable: NAME=value`` headers (Asterisk sends one per variable)."""
        out: dict[str, str] = {}
        pairs = [("ChanVariable", self["ChanVariable"])] if "ChanVariable" in self else []
        for key, value in pairs + self.extra:
            if key == "ChanVariable" and "=" in value:
                name, _, val = value.partition("=")
                out[name] = val
        return out


def parse_line(message: Message, line: str) -> None:
    """Add one header line; a line without ``: `` is kept under an empty key (command output)."""
    key, sep, value = line.partition(":")
    if not sep:
        key, value = "", line
    key = key.strip()
    value = value[1:] if value.startswith(" ") else value
    if key in message:
        message.extra.append((key, value))
    else:
        message[key] = value


class MessageSplitter:
    """Feeds lines in, yields complete messages; bounds every line and message."""

    def __init__(self, max_line: int = MAX_LINE, max_headers: int = MAX_HEADERS) -> None:
        self.max_line = max_line
        self.max_headers = max_headers
        self._current = Message()
        self._lines = 0

    def line(self, raw: bytes) -> Message | None:
        """One line (with or without its line ending); returns a message when one ends."""
        if len(raw) > self.max_line:
            raise ProtocolError(f"AMI line of {len(raw)} bytes is longer than {self.max_line}")
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not text:
            if not self._lines:
                return None
            done, self._current, self._lines = self._current, Message(), 0
            return done
        self._lines += 1
        if self._lines > self.max_headers:
            raise ProtocolError(f"AMI message has more than {self.max_headers} lines")
        parse_line(self._current, text)
        return None


def split(data: bytes, max_line: int = MAX_LINE) -> Iterator[Message]:
    """All messages in a raw recording (``\\r\\n`` lines, blank line after each message)."""
    splitter = MessageSplitter(max_line)
    for raw in data.split(b"\n"):
        msg = splitter.line(raw)
        if msg is not None:
            yield msg
    last = splitter.line(b"")
    if last is not None:
        yield last


def encode(headers: Iterable[tuple[str, str]]) -> bytes:
    """One message on the wire; CR/LF inside a value would start a new header, so refuse it."""
    out = []
    for key, value in headers:
        if any(c in key + value for c in "\r\n"):
            raise InputError(f"AMI header {key!r} holds a line break")
        out.append(f"{key}: {value}\r\n")
    out.append("\r\n")
    return "".join(out).encode()


def action(name: str, action_id: str, **headers: str) -> bytes:
    return encode([("Action", name), ("ActionID", action_id), *headers.items()])


def timestamp_us(value: str) -> int | None:
    """``Timestamp: 1795315322.176463`` as integer microseconds, exactly; None if malformed."""
    whole, _, frac = value.strip().partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        return None
    return int(whole) * 1_000_000 + int((frac + "000000")[:6] or 0)
