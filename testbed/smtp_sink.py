"""An SMTP sink for the end-to-end tests and the demo: every mail it gets is kept in memory and
written to a folder as ``<n>-<recipient>.eml``.

    with SmtpSink(Path("/tmp/mail")) as sink:       # listens on 127.0.0.1:sink.port
        ...
        mail = sink.wait_for(lambda m: m["To"] == "erin@example.org", timeout=10)

Run alone: ``python -m testbed.smtp_sink --dir /tmp/mail [--port 2525]`` (until Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import threading
import time
from collections.abc import Callable
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller

from testbed.servers import free_port


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw: bytes = envelope.original_content or envelope.content
        self.sink._received(raw, list(envelope.rcpt_tos))
        return "250 OK"


class SmtpSink:
    """aiosmtpd in its own thread on ``host:port`` (a free port when 0)."""

    def __init__(self, folder: Path | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.folder = folder
        self.host = host
        self.port = port or free_port()
        self.messages: list[Message] = []
        self.recipients: list[list[str]] = []
        self._cond = threading.Condition()
        self._controller: Controller | None = None

    def start(self) -> SmtpSink:
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._controller = Controller(_Handler(self), hostname=self.host, port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _received(self, raw: bytes, rcpt: list[str]) -> None:
        msg = message_from_bytes(raw)
        with self._cond:
            self.messages.append(msg)
            self.recipients.append(rcpt)
            n = len(self.messages)
            self._cond.notify_all()
        if self.folder is not None:
            who = re.sub(r"[^A-Za-z0-9_.@+-]", "_", rcpt[0] if rcpt else "nobody")[:80]
            path = self.folder / f"{n:04d}-{who}.eml"
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(raw)
            tmp.replace(path)  # readers never see half a mail

    def count(self) -> int:
        with self._cond:
            return len(self.messages)

    def wait_for(self, match: Callable[[Message], bool], timeout: float = 10.0,
                 start: int = 0) -> Message:
        """The first mail from index ``start`` on for which ``match`` is true (bounded)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.messages[start:]:
                    if match(msg):
                        return msg
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [str(m["Subject"]) for m in self.messages]
                    raise TimeoutError(f"no matching mail after {timeout}s (got {seen})")
                self._cond.wait(remaining)


def body_text(msg: Message) -> str:
    """The text/plain part of a mail, decoded."""
    for part in msg.walk() if msg.is_multipart() else [msg]:
        if part.get_content_type() == "text/plain":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                return payload.decode(part.get_content_charset() or "utf-8", errors="replace")
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="folder to write mails to")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with SmtpSink(args.dir, args.host, args.port) as sink:
        print(f"SMTP sink on {sink.host}:{sink.port}, writing to {args.dir}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
