"""Record a raw AMI event stream for test fixtures.

    python -m testbed.record_ami OUT.ami --host 127.0.0.1 --port 5038 --user U --secret S \\
        [--timeout 30] [--action "Action: Originate; ActionID: orig-1; Channel: ...; ..."]

Logs in, then saves every message that follows the Login response exactly as received
(bytes, `\\r\\n` line ends, a blank line after each message), the format of the recordings
in shared/ami-recordings/. The banner and the Login response are not saved. Actions given
with --action (`;`-separated `Key: Value` fields, repeatable) are sent after the login, so
their responses are in the recording too. Stops on Ctrl-C / SIGTERM, after --timeout
seconds, or after --until-event NAME has been seen --count times; only whole messages
are written.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType

END = b"\r\n\r\n"


class Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop


def encode_action(spec: str) -> bytes:
    """'Action: Ping; ActionID: p-1' -> b'Action: Ping\\r\\nActionID: p-1\\r\\n\\r\\n'."""
    fields = [f.strip() for f in spec.split(";") if f.strip()]
    for f in fields:
        if ":" not in f:
            raise ValueError(f"not a 'Key: Value' field: {f!r}")
    return ("\r\n".join(fields)).encode() + END


def login(sock: socket.socket, user: str, secret: str) -> bytes:
    """Read the banner, log in; returns bytes received after the Login response."""
    buf = b""
    while b"\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed before the banner")
        buf += chunk
    banner, _, buf = buf.partition(b"\r\n")
    if not banner.startswith(b"Asterisk Call Manager/"):
        raise ConnectionError(f"not an AMI banner: {banner!r}")
    sock.sendall(
        f"Action: Login\r\nActionID: record-login\r\nUsername: {user}\r\n"
        f"Secret: {secret}\r\nEvents: on\r\n\r\n".encode()
    )
    while True:
        while END not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed during login")
            buf += chunk
        msg, _, buf = buf.partition(END)
        if b"ActionID: record-login" in msg:
            if b"Response: Success" not in msg:
                raise PermissionError(msg.decode(errors="replace"))
            return buf


def record(
    out: Path,
    host: str,
    port: int,
    user: str,
    secret: str,
    timeout: float,
    actions: list[str] | None = None,
    until_event: str | None = None,
    count: int = 1,
) -> int:
    """Record to `out`; returns the number of messages written."""
    deadline = time.monotonic() + timeout
    written = 0
    seen = 0
    with socket.create_connection((host, port), timeout=10) as sock, out.open("wb") as f:
        buf = login(sock, user, secret)
        for spec in actions or []:
            sock.sendall(encode_action(spec))
        try:
            while True:
                while END in buf:
                    msg, _, buf = buf.partition(END)
                    f.write(msg + END)
                    f.flush()
                    written += 1
                    if until_event and f"Event: {until_event}\r\n".encode() in msg + b"\r\n":
                        seen += 1
                        if seen >= count:
                            return written
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return written
                sock.settimeout(min(remaining, 1.0))
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    return written
                buf += chunk
        except Stop:
            return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.record_ami", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5038)
    ap.add_argument("--user", required=True)
    ap.add_argument("--secret", required=True)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    ap.add_argument("--action", action="append", default=[],
                    help="an action to send after login: 'Action: X; Key: Value; ...'")
    ap.add_argument("--until-event", help="stop after this event (e.g. Cdr)")
    ap.add_argument("--count", type=int, default=1, help="... seen this many times")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    n = record(args.out, args.host, args.port, args.user, args.secret, args.timeout,
               args.action, args.until_event, args.count)
    print(f"record_ami: {n} messages written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
