"""The AMI adapter (ami_listener/client.py) against a peer that speaks the real wire format
over a real loopback socket, one test per panoramisk trap the adapter closes.

The ``test_panoramisk_*`` tests show each trap in bare panoramisk 1.4 (its Manager or
AMIProtocol), so docs/design.md states them as measured; they are skipped on other versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from ami_listener import client as client_module
from ami_listener.client import AmiClient, AmiError
from ami_listener.protocol import (
    MAX_HEADERS,
    MAX_LINE,
    Message,
    MessageSplitter,
    ProtocolError,
    encode,
    split,
)
from testbed.ami_peer import FIXTURES

BANNER = b"Asterisk Call Manager/9.0.0\r\n"
SECRET = "s3cret-Xy7"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "ami-recordings"
RECORDINGS = sorted(FIXTURES.rglob("*.ami")) + sorted(SHARED.glob("*.ami"))
PEER_TASKS = {"BaseSelectorEventLoop._accept_connection2", "Peer._serve"}
pano14 = pytest.mark.skipif(version("panoramisk") != "1.4",
                            reason="shows panoramisk 1.4's own behaviour")


def event(name: str, *extra: tuple[str, str], **headers: str) -> bytes:
    return encode([("Event", name), *headers.items(), *extra])


class Peer:
    """An Asterisk manager the test scripts: banner, Login, answers; then raw bytes."""

    def __init__(self) -> None:
        self.port = 0
        self.banner = BANNER
        self.pings = True  # answer Ping
        self.ignore: set[str] = set()  # actions (lower case) left unanswered
        self.close_on_login = False
        self.fully_booted = True  # Asterisk sends FullyBooted after a login
        self.actions: list[Message] = []
        self.writer: asyncio.StreamWriter | None = None
        self.logged_in = asyncio.Event()
        self.eof = asyncio.Event()  # the client closed the connection
        self._server: asyncio.Server | None = None
        self._serving: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in self._serving:
            task.cancel()
        await asyncio.gather(*self._serving, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Each write its own TCP segment: the tests decide where the reads split.
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        self.writer = writer
        writer.write(self.banner)
        splitter = MessageSplitter()
        try:
            with contextlib.suppress(OSError):
                while line := await reader.readline():
                    msg = splitter.line(line)
                    if msg is not None:
                        self._answer(msg, writer)
            self.eof.set()
        except asyncio.CancelledError:
            pass  # the test is over: stop() ends every connection
        finally:
            writer.close()

    def _answer(self, msg: Message, writer: asyncio.StreamWriter) -> None:
        self.actions.append(msg)
        name, aid = msg.get("Action", "").lower(), msg.get("ActionID", "")
        if name in self.ignore or (name == "ping" and not self.pings):
            return
        if name == "login":
            if self.close_on_login:
                writer.close()
                return
            ok = msg.get("Secret") == SECRET
            writer.write(encode([("Response", "Success" if ok else "Error"), ("ActionID", aid),
                                 ("Message", "Authentication accepted" if ok
                                  else "Authentication failed")]))
            if ok:
                if self.fully_booted:
                    writer.write(event("FullyBooted", Privilege="system,all", Status="ok"))
                self.logged_in.set()
        elif name == "ping":
            writer.write(encode([("Response", "Success"), ("ActionID", aid), ("Ping", "Pong"),
                                 ("Timestamp", "1795315322.176463")]))
        elif name == "nosuchthing":
            writer.write(encode([("Response", "Error"), ("ActionID", aid),
                                 ("Message", "Invalid/unknown command")]))
        else:
            writer.write(encode([("Response", "Success"), ("ActionID", aid)]))

    async def send(self, *parts: bytes, pause: float = 0.05) -> None:
        """Each part in its own TCP send, with a pause between for the client to read it."""
        assert self.writer is not None
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(pause)
            self.writer.write(part)
            await self.writer.drain()

    def answer(self, action_id: str) -> bytes:
        return encode([("Response", "Success"), ("ActionID", action_id)])

    def sent(self, name: str) -> list[Message]:
        return [m for m in self.actions if m.get("Action", "").lower() == name.lower()]


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    p = Peer()
    await p.start()
    yield p
    await p.stop()


def make(peer: Peer, **kw: Any) -> AmiClient:
    return AmiClient("127.0.0.1", peer.port, "prepaid", SECRET, timeout=0.5, **kw)


@contextlib.asynccontextmanager
async def connected(peer: Peer, **kw: Any) -> AsyncIterator[AmiClient]:
    client = make(peer, **kw)
    await client.connect()
    try:
        first = await client.read(1.0)
        assert first is not None and first.event == "FullyBooted"
        yield client
    finally:
        await client.close()


async def until(check: Callable[[], bool], what: str) -> None:
    """Poll a condition for up to 2 s (not a sleep for luck)."""
    deadline = asyncio.get_running_loop().time() + 2.0
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


# -- the wire: the same messages as the file splitter, whatever the reads ----------------

async def test_messages_equal_the_file_splitter_over_every_recording(peer: Peer) -> None:
    rng = random.Random(10)
    async with connected(peer) as client:
        for path in RECORDINGS:
            raw = path.read_bytes()
            want = [m for m in split(raw) if "Event" in m]
            cuts = sorted(rng.sample(range(1, len(raw)), 12))  # 13 TCP sends of odd sizes
            parts = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
            await peer.send(*parts, pause=0.001)
            got = [await client.read(1.0) for _ in want]
            assert [(dict(m), m.extra) for m in got if m is not None] == \
                [(dict(m), m.extra) for m in want], path.name


def test_parse_equals_the_file_splitter_on_every_recorded_message() -> None:
    count = 0
    for path in RECORDINGS:
        raw = path.read_bytes()
        got = [m for m in map(client_module.parse, raw.split(b"\r\n\r\n")) if m is not None]
        want = list(split(raw))
        assert [(dict(m), m.extra) for m in got] == [(dict(m), m.extra) for m in want]
        count += len(want)
    assert count >= 1_500  # responses and events of every recording


async def test_repeated_chanvariable_headers_are_kept_in_extra(peer: Peer) -> None:
    async with connected(peer) as client:
        await peer.send(event("Hangup", ("ChanVariable", "PREPAID_ACCOUNT=alice"),
                              ("ChanVariable", "PREPAID_REF=1795315339.16"),
                              ("ChanVariable", "EMPTY="), Uniqueid="1795315339.16",
                              BridgeId=""))
        msg = await client.read(1.0)
    assert msg is not None and msg["ChanVariable"] == "PREPAID_ACCOUNT=alice"
    assert msg.extra == [("ChanVariable", "PREPAID_REF=1795315339.16"),
                         ("ChanVariable", "EMPTY=")]
    assert msg.variables() == {"PREPAID_ACCOUNT": "alice", "PREPAID_REF": "1795315339.16",
                               "EMPTY": ""}
    assert msg["BridgeId"] == ""  # an empty last header survives (no .strip())


# -- trap: a callback that raises drops the connection -----------------------------------

def handle(msg: Message) -> None:
    raise KeyError(msg["NoSuchHeader"])  # a bug in the caller's handler


async def test_a_handler_that_raises_leaves_the_link_up(peer: Peer) -> None:
    async with connected(peer) as client:
        await peer.send(event("Newchannel", Uniqueid="1.1") + event("Hangup", Uniqueid="1.1"))
        first = await client.read(1.0)
        assert first is not None
        with pytest.raises(KeyError):  # the caller's handler fails on the first event
            handle(first)
        second = await client.read(1.0)
        assert second is not None and second.event == "Hangup"
        assert (await client.action("Ping"))["Ping"] == "Pong"
        assert not peer.eof.is_set()


async def test_a_full_queue_closes_the_link_loudly_after_the_events_it_holds(
        peer: Peer) -> None:
    async with connected(peer, queue_size=5) as client:
        await peer.send(b"".join(event("Newstate", Uniqueid=f"1.{i}") for i in range(8)))
        await until(lambda: client.overflows == 1, "overflow noticed")
        await asyncio.wait_for(peer.eof.wait(), 2)  # the adapter closed the link
        got = [await client.read(1.0) for _ in range(5)]  # nothing read is thrown away
        assert [m.get("Uniqueid") for m in got if m] == [f"1.{i}" for i in range(5)]
        with pytest.raises(AmiError, match="faster than they were handled: 5 waiting"):
            await client.read(1.0)


async def test_garbage_never_escapes_into_asyncio_fatal_errors(
        peer: Peer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with connected(peer) as client:
        await peer.send(b"X" * (MAX_LINE + 10) + b"\r\n\r\n")
        with pytest.raises(ProtocolError):
            await client.read(1.0)
    assert not [r for r in caplog.records if r.name == "asyncio"]


# -- trap: the Manager's FullyBooted handler is an unowned task --------------------------

async def test_the_adapter_creates_no_task(peer: Peer) -> None:
    loop = asyncio.get_running_loop()
    created: list[asyncio.Task[Any]] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any],
                **kw: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kw)
        created.append(task)
        return task

    loop.set_task_factory(factory)  # type: ignore[arg-type]
    try:
        async with connected(peer) as client:  # FullyBooted is read as an event
            client.send("CoreShowChannels")
            await client.action("Ping")
            await peer.send(event("Hangup", Uniqueid="1.1"))
            assert await client.read(1.0) is not None
            assert await client.read(0.05) is None
    finally:
        loop.set_task_factory(None)
    names = [t.get_coro().__qualname__ for t in created]  # type: ignore[union-attr]
    assert [n for n in names if n not in PEER_TASKS] == []  # the peer's own: accept, serve
    assert asyncio.all_tasks() - set(created) == {asyncio.current_task()}


# -- trap: pings are never checked --------------------------------------------------------

async def test_an_unanswered_ping_is_noticed(peer: Peer) -> None:
    async with connected(peer) as client:
        peer.pings = False  # the path died quietly: the socket is open, nothing comes back
        async with asyncio.timeout(2):
            with pytest.raises(AmiError, match="Ping to 127.0.0.1:.* not answered within 0.5 s"):
                await client.action("Ping")
        heard = client.heard  # the listener's own way: send, then see if anything came
        client.send("Ping")
        assert await client.read(0.2) is None and client.heard == heard
        peer.pings = True
        client.send("Ping")
        assert await client.read(0.2) is None and client.heard == heard + 1


# -- trap: actions have no time-out -------------------------------------------------------

async def test_an_action_times_out_and_a_late_answer_is_ignored(peer: Peer) -> None:
    async with connected(peer) as client:
        peer.ignore.add("status")
        async with asyncio.timeout(2):
            with pytest.raises(AmiError, match="Status to .* not answered within 0.5 s"):
                await client.action("Status")
        assert client._pending == {}
        await peer.send(peer.answer(peer.sent("Status")[0]["ActionID"]))
        assert await client.read(0.1) is None and client.failures == 0
        error = await client.action("NoSuchThing")  # an error answer is returned as it is
        assert error["Response"] == "Error" and error["Message"] == "Invalid/unknown command"


async def test_an_action_is_answered_while_nobody_reads(peer: Peer) -> None:
    async with connected(peer) as client:
        await peer.send(b"".join(event("Newstate", Uniqueid=f"1.{i}") for i in range(3)))
        answer = await client.action("Ping")  # the three events wait in the queue
        assert answer["Ping"] == "Pong" and client.queued == 3


async def test_a_send_answered_with_an_error_is_counted(peer: Peer) -> None:
    async with connected(peer) as client:
        client.send("NoSuchThing")
        client.send("Setvar", Channel="Local/1@x-1;1", Variable="TIMEOUT(absolute)", Value="9")
        await client.action("Ping")  # answered in order: the two before are settled
        assert client.failures == 1 and client._pending == {}


async def test_an_action_waiting_when_the_link_drops_gets_amierror(peer: Peer) -> None:
    async with connected(peer) as client:
        peer.ignore.add("status")
        waiting = asyncio.ensure_future(client.action("Status"))
        await until(lambda: bool(peer.sent("status")), "action sent")
        assert peer.writer is not None
        peer.writer.close()
        with pytest.raises(AmiError, match="closed the connection"):
            await waiting


# -- trap: there are no line or message limits --------------------------------------------

async def test_a_line_too_long_closes_the_link_before_it_ends(peer: Peer) -> None:
    async with connected(peer) as client:
        await peer.send(event("Hangup", Uniqueid="1.1"))
        chunk = b"Event: Hangup\r\nCallerIDName: " + b"A" * 3000
        await peer.send(chunk, b"A" * 3000, b"A" * 3000)  # never ends its line
        await asyncio.wait_for(peer.eof.wait(), 2)
        assert await client.read(1.0) is not None  # the event before is still delivered
        with pytest.raises(ProtocolError, match=f"longer than {MAX_LINE} bytes"):
            await client.read(1.0)


async def test_a_long_line_inside_a_whole_message_is_refused(peer: Peer) -> None:
    async with connected(peer) as client:
        await peer.send(event("Hangup", Uniqueid="1.1", CallerIDName="B" * MAX_LINE))
        with pytest.raises(ProtocolError, match="longer than"):
            await client.read(1.0)
        await asyncio.wait_for(peer.eof.wait(), 2)


@pytest.mark.parametrize("ended", [True, False], ids=["whole", "unterminated"])
async def test_too_many_headers_close_the_link(peer: Peer, ended: bool) -> None:
    async with connected(peer) as client:
        ok = event("Newexten", *[("AppData", str(i)) for i in range(MAX_HEADERS - 1)])
        await peer.send(ok)  # exactly the bound: accepted
        msg = await client.read(1.0)
        assert msg is not None and len(msg.extra) == MAX_HEADERS - 2
        big = event("Newexten", *[("AppData", str(i)) for i in range(MAX_HEADERS)])
        await peer.send(big if ended else big[:-2])
        with pytest.raises(ProtocolError, match=f"more than {MAX_HEADERS} lines"):
            await client.read(1.0)
        await asyncio.wait_for(peer.eof.wait(), 2)


async def test_a_peer_that_sends_no_banner_line_is_refused(peer: Peer) -> None:
    peer.banner = b"H" * (MAX_LINE + 1)
    with pytest.raises(AmiError, match="sent no banner line"):
        await make(peer).connect()


# -- trap: a UTF-8 character split across two reads is lost -------------------------------

async def test_a_utf8_character_split_across_two_tcp_sends(
        peer: Peer, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[bytes] = []
    real = client_module._Wire.data_received

    def spy(self: client_module._Wire, data: bytes) -> None:
        reads.append(data)
        real(self, data)

    monkeypatch.setattr(client_module._Wire, "data_received", spy)
    async with connected(peer) as client:
        raw = event("Newchannel", Uniqueid="1.1", CallerIDName="Jürgen Ñúñez 電話")
        cut = raw.index("ü".encode()) + 1  # between the two bytes of ü
        reads.clear()
        await peer.send(raw[:cut], raw[cut:])
        msg = await client.read(1.0)
    assert reads[:2] == [raw[:cut], raw[cut:]]  # two reads, split inside the character
    assert msg is not None and msg["CallerIDName"] == "Jürgen Ñúñez 電話"


# -- trap: a refused login is silent -------------------------------------------------------

async def test_a_refused_login_names_user_and_server_never_the_secret(
        peer: Peer, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    client = AmiClient("127.0.0.1", peer.port, "prepaid", "wrong-Zq9", timeout=0.5)
    with pytest.raises(AmiError) as caught:
        await client.connect()
    text = str(caught.value)
    assert "'prepaid'" in text and f"127.0.0.1:{peer.port}" in text
    assert "refused: Authentication failed" in text
    out = capsys.readouterr()
    for where in (text, caplog.text, out.out, out.err):
        assert "wrong-Zq9" not in where
    await asyncio.wait_for(peer.eof.wait(), 2)  # and the connection is closed


async def test_a_login_the_server_hangs_up_on_is_an_error(peer: Peer) -> None:
    peer.close_on_login = True
    with pytest.raises(AmiError, match=r"login as 'prepaid' at 127.0.0.1:\d+ got no answer"):
        await make(peer).connect()


async def test_connect_errors_name_the_server() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here
    with pytest.raises(AmiError, match=f"cannot connect to AMI at 127.0.0.1:{port}"):
        await AmiClient("127.0.0.1", port, "prepaid", SECRET, timeout=0.5).connect()


async def test_a_peer_that_is_not_asterisk_is_refused(peer: Peer) -> None:
    peer.banner = b"SSH-2.0-OpenSSH_9.2\r\n"
    with pytest.raises(AmiError, match="is not an Asterisk manager"):
        await make(peer).connect()


# -- one outage, one error ----------------------------------------------------------------

async def test_an_outage_raises_once_and_logs_nothing_per_action(
        peer: Peer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="ami_listener")
    async with connected(peer) as client:
        await peer.send(event("Hangup", Uniqueid="1.1"))
        await until(lambda: client.queued == 1, "event queued")
        assert peer.writer is not None
        peer.writer.close()  # Asterisk drops the session
        await until(lambda: client._down is not None, "drop noticed")
        with pytest.raises(AmiError, match="closed the connection; Hangup not sent"):
            client.send("Hangup", Channel="Local/1@x-1;1", Cause="16")
        for _ in range(1000):  # the rest of the outage: counted, not raised
            assert client.send("Setvar", Channel="Local/1@x-1;1", Variable="X", Value="1") == ""
        assert client.failures == 1000
        last = await client.read(1.0)  # read before the drop: still delivered
        assert last is not None and last.event == "Hangup"
        for _ in range(3):
            with pytest.raises(AmiError, match="closed the connection"):
                await client.read(1.0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([r for r in caplog.records if "down:" in r.getMessage()]) == 1


async def test_close_fails_what_waits_and_reads_raise(peer: Peer) -> None:
    async with connected(peer) as client:
        reader = asyncio.ensure_future(client.read(5.0))
        await asyncio.sleep(0.01)
        await client.close()
        with pytest.raises(AmiError, match="was closed"):
            await reader
        with pytest.raises(AmiError):
            client.send("Ping")
        with pytest.raises(AmiError):
            await client.action("Ping")
    await asyncio.wait_for(peer.eof.wait(), 2)


# -- panoramisk 1.4 itself: each trap as it is ----------------------------------------------

class _Factory:
    """What AMIProtocol calls back into (a Manager's place), recording it."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.forgetable_actions = ("ping", "login")
        self.awaiting_actions: list[Any] = []

    def dispatch(self, message: Any) -> None:
        self.events.append(message)

    def connection_lost(self, exc: object) -> None:
        pass


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        pass


def _bare_protocol() -> tuple[Any, _Factory]:
    from panoramisk.ami_protocol import AMIProtocol

    proto = AMIProtocol()
    proto.connection_made(_Transport())
    factory = _Factory()
    proto.factory, proto.encoding = factory, "utf8"  # as Manager.connection_made sets them
    return proto, factory


@pano14
def test_panoramisk_loses_a_utf8_character_split_across_reads() -> None:
    proto, factory = _bare_protocol()
    raw = event("Newchannel", Uniqueid="1.1", CallerIDName="Jürgen")
    cut = raw.index("ü".encode()) + 1
    proto.data_received(raw[:cut])
    proto.data_received(raw[cut:])
    assert factory.events[0]["CallerIDName"] == "Jrgen"


@pano14
def test_panoramisk_buffers_an_endless_line_without_limit() -> None:
    proto, _ = _bare_protocol()
    for _ in range(64):
        proto.data_received(b"A" * 65536)  # 4 MiB, no line end: all kept, no error
    assert len(proto.queue[0]) == 64 * 65536


@pano14
def test_panoramisk_drops_an_empty_last_header() -> None:
    proto, factory = _bare_protocol()
    proto.data_received(event("Hangup", Uniqueid="1.1", BridgeId=""))
    assert "Uniqueid" in factory.events[0] and "BridgeId" not in factory.events[0]


@pano14
async def test_panoramisk_drops_the_connection_when_a_callback_raises(
        peer: Peer, caplog: pytest.LogCaptureFixture) -> None:
    from panoramisk import Manager

    manager = Manager(host="127.0.0.1", port=peer.port, username="prepaid", secret=SECRET,
                      ping_delay=60, reconnect_timeout=60, loop=asyncio.get_running_loop())
    lost: list[object] = []
    manager.on_disconnect = lambda _m, exc: lost.append(exc)
    manager.register_event("Hangup", lambda _m, e: handle(e))
    try:
        await manager.connect()
        await asyncio.wait_for(peer.logged_in.wait(), 2)
        await peer.send(event("Hangup", Uniqueid="1.1"))
        await asyncio.wait_for(peer.eof.wait(), 2)  # one KeyError in a handler: link gone
        await until(lambda: bool(lost), "panoramisk noticed")
    finally:
        manager.close()
    assert "data_received() call failed" in caplog.text


@pano14
async def test_panoramisk_starts_a_task_it_keeps_no_reference_to(peer: Peer) -> None:
    from panoramisk import Manager

    loop = asyncio.get_running_loop()
    created: list[str] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any],
                **kw: Any) -> asyncio.Task[Any]:
        created.append(getattr(coro, "__qualname__", ""))
        return asyncio.Task(coro, loop=loop, **kw)

    manager = Manager(host="127.0.0.1", port=peer.port, username="prepaid", secret=SECRET,
                      ping_delay=60, reconnect_timeout=60, loop=loop)
    loop.set_task_factory(factory)  # type: ignore[arg-type]
    try:
        await manager.connect()  # itself a Task the Manager made and does not keep
        await asyncio.wait_for(peer.logged_in.wait(), 2)
        # Its FullyBooted handler, started by dispatch() with ensure_future and not kept:
        # an error there is only "Task exception was never retrieved", and no close() ends it.
        await until(lambda: "Manager.send_awaiting_actions" in created, "FullyBooted task")
    finally:
        loop.set_task_factory(None)
        manager.close()


@pano14
async def test_panoramisk_is_silent_about_a_refused_login(
        peer: Peer, caplog: pytest.LogCaptureFixture) -> None:
    from panoramisk import Manager

    caplog.set_level(logging.INFO)
    manager = Manager(host="127.0.0.1", port=peer.port, username="prepaid", secret="wrong",
                      ping_delay=60, reconnect_timeout=60, loop=asyncio.get_running_loop())
    try:
        await manager.connect()
        await until(lambda: manager.authenticated_future is None, "login answered")
        assert manager.authenticated is False
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        peer.pings = False
        future = manager.send_action({"Action": "Ping"})  # and nothing bounds this wait
        await asyncio.sleep(0.3)
        assert not future.done()
    finally:
        manager.close()
