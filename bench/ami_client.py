"""AMI parse throughput on a loopback socket: the adapter against the old ``readline`` path.

A server thread (blocking sockets, so it costs the event loop nothing) sends the banner,
answers the Login, then streams every recording of testbed/recordings/ (events only, again
and again) and closes.  Each reader counts events from the Login's answer to the close:

- ``readline``: the client this project had before panoramisk (``StreamReader.readline``
  and ``MessageSplitter``, one ``read`` per event), copied here as it was;
- ``adapter``: ``ami_listener.client.AmiClient`` (panoramisk's parser, bounded, queued);
- ``panoramisk``: bare panoramisk 1.4 ``AMIProtocol`` with a counting dispatch, for
  reference: no bounds, no queue, its own messages (not ours).

Rounds alternate between the readers; the figure is each one's median, the ratio is taken
from the same run.  One process, one event loop.  ``python -m bench ami_client``.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ami_listener.client import AmiClient, AmiError
from ami_listener.protocol import MAX_LINE, Message, MessageSplitter, action, split
from testbed.ami_peer import FIXTURES

BANNER = b"Asterisk Call Manager/9.0.0\r\n"
EVENTS = 50_000  # per round
ROUNDS = 3  # per reader


def _stream(events: int) -> tuple[bytes, int]:
    """Recorded events, re-encoded as they came, up to about ``events``."""
    one = []
    for path in sorted(FIXTURES.rglob("*.ami")):
        raw = path.read_bytes()
        for block in raw.split(b"\r\n\r\n"):
            if block.startswith(b"Event: "):
                one.append(block + b"\r\n\r\n")
    repeat = max(1, events // len(one))
    return b"".join(one) * repeat, len(one) * repeat


class Server:
    """One connection at a time: banner, Login answered, the stream, close."""

    def __init__(self, stream: bytes) -> None:
        self.stream = stream
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(BANNER)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(4096)
                aid = next(line.split(b": ", 1)[1] for line in data.split(b"\r\n")
                           if line.startswith(b"ActionID: "))
                conn.sendall(b"Response: Success\r\nActionID: " + aid +
                             b"\r\nMessage: Authentication accepted\r\n\r\n" + self.stream)

    def close(self) -> None:
        self.sock.close()


class ReadlinePath:
    """The AMI client's reading before panoramisk (ami_listener/client.py until then)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.splitter = MessageSplitter(MAX_LINE)

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port,
                                                                 limit=MAX_LINE)
        await self.reader.readline()  # banner
        self.writer.write(action("Login", "prepaid-1", Username="prepaid", Secret="x",
                                 Events="call,cdr,dialplan"))
        while (await self._read_message()).get("ActionID") != "prepaid-1":
            pass

    async def _read_message(self) -> Message:
        while True:
            raw = await self.reader.readline()
            if not raw:
                raise AmiError("closed")
            msg = self.splitter.line(raw)
            if msg is not None:
                return msg

    async def read(self, idle: float) -> Message | None:
        try:
            async with asyncio.timeout(idle):
                while True:
                    msg = await self._read_message()
                    if "Event" in msg:
                        return msg
        except TimeoutError:
            return None

    async def close(self) -> None:
        self.writer.close()


async def _drain(client: Any) -> tuple[int, float]:
    await client.connect()
    started = time.perf_counter()
    count = 0
    try:
        while await client.read(5.0) is not None:
            count += 1
    except AmiError:
        pass
    elapsed = time.perf_counter() - started
    await client.close()
    return count, elapsed


async def readline(port: int) -> tuple[int, float]:
    return await _drain(ReadlinePath(port))


async def adapter(port: int) -> tuple[int, float]:
    # The default queue: the reader drains it between reads (peak about 600 here).
    return await _drain(AmiClient("127.0.0.1", port, "prepaid", "x"))


async def panoramisk(port: int) -> tuple[int, float]:
    from panoramisk.ami_protocol import AMIProtocol

    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    state = {"events": 0, "started": 0.0}

    class Factory:  # the part of panoramisk's Manager its protocol calls
        forgetable_actions = ("ping", "login")
        awaiting_actions: list[Any] = []

        def dispatch(self, message: Any) -> None:
            state["events"] += 1

        def connection_lost(self, exc: object) -> None:
            if not done.done():
                done.set_result(None)

    class Counting(AMIProtocol):  # type: ignore[misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.factory, self.encoding = Factory(), "utf8"

        def handle_message(self, message: Any) -> None:
            if not state["started"] and message.get("Response"):
                state["started"] = time.perf_counter()  # the Login's answer
                return
            super().handle_message(message)

    transport, _ = await loop.create_connection(Counting, "127.0.0.1", port)
    transport.write(action("Login", "prepaid-1", Username="prepaid", Secret="x"))
    await done
    return int(state["events"]), time.perf_counter() - state["started"]


READERS: dict[str, Callable[[int], Awaitable[tuple[int, float]]]] = {
    "readline": readline, "adapter": adapter, "panoramisk": panoramisk}


async def _bench(events: int, rounds: int) -> dict[str, Any]:
    stream, expected = _stream(events)
    assert expected == sum(1 for m in split(stream) if "Event" in m)
    server = Server(stream)
    rates: dict[str, list[float]] = {name: [] for name in READERS}
    try:
        for _ in range(rounds):
            for name, reader in READERS.items():
                count, elapsed = await reader(server.port)
                assert count == expected, f"{name} read {count} of {expected} events"
                rates[name].append(count / elapsed)
    finally:
        server.close()
    median = {name: statistics.median(r) for name, r in rates.items()}
    return {"events_per_round": expected, "rounds": rounds,
            "stream_bytes": len(stream),
            "readline_events_per_second": round(median["readline"]),
            "adapter_events_per_second": round(median["adapter"]),
            "panoramisk_bare_events_per_second": round(median["panoramisk"]),
            "adapter_vs_readline": round(median["adapter"] / median["readline"], 2),
            "panoramisk_bare_vs_readline": round(median["panoramisk"] / median["readline"], 2),
            "note": "loopback, one core; medians of alternating rounds"}


def run(events: int = EVENTS, rounds: int = ROUNDS) -> dict[str, Any]:
    return asyncio.run(_bench(events, rounds))


def main() -> None:
    for key, value in run().items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
