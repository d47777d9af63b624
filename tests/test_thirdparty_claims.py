"""What docs/design.md says about panoramisk 1.4 and pyst2 0.5.1, measured on the real libraries.

Each test drives the library over a real socket or pipe with the real AMI or AGI bytes and
asserts what happens; the design's "Packages" section cites them.  They are skipped on other
versions of the libraries, whose behaviour they do not describe.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import IO, Any

import pytest


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return ""


pano14 = pytest.mark.skipif(_version("panoramisk") != "1.4",
                            reason="shows panoramisk 1.4's own behaviour")
pyst051 = pytest.mark.skipif(_version("pyst2") != "0.5.1",
                             reason="shows pyst2 0.5.1's own behaviour")

BANNER = b"Asterisk Call Manager/9.0.0\r\n"
AGI_ENV = (b"agi_network: yes\nagi_network_script: authorize\nagi_channel: PJSIP/1001-00000001\n"
           b"agi_uniqueid: 1700000000.1\nagi_callerid: 1001\nagi_extension: 00491701234567\n\n")
# The three 520 lines res_agi.so sends (all three are in the test bed's Asterisk module).
CUT = AGI_ENV.index(b"PJSIP") + 5  # "...agi_channel: PJSIP", cut inside a value
USAGE_ONE = b"520 Invalid command syntax.  Proper usage not available.\n"
USAGE_MANY = (b"520-Invalid command syntax.  Proper usage follows:\n"
              b" Usage: GET VARIABLE <variablename>\n"
              b"520 End of proper usage.\n")


# -- panoramisk: the AMI Manager's callbacks ----------------------------------------------

class AmiPeer:
    """An Asterisk manager: the banner, a successful Login, then what the test sends."""

    def __init__(self) -> None:
        self.port = 0
        self.writer: asyncio.StreamWriter | None = None
        self.logged_in = asyncio.Event()
        self.eof = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        writer.write(BANNER)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while message := await reader.readuntil(b"\r\n\r\n"):
                headers = dict(line.split(": ", 1) for line in
                               message.decode().strip().split("\r\n") if ": " in line)
                if headers.get("Action", "").lower() == "login":
                    writer.write(b"Response: Success\r\nActionID: %s\r\n"
                                 b"Message: Authentication accepted\r\n\r\n"
                                 % headers["ActionID"].encode())
                    self.logged_in.set()
        self.eof.set()

    async def event(self, name: str) -> None:
        assert self.writer is not None
        self.writer.write(b"Event: %s\r\nPrivilege: call,all\r\nUniqueid: 1700000000.1\r\n\r\n"
                          % name.encode())
        await self.writer.drain()


@pano14
async def test_panoramisk_plain_callback_starts_no_task_and_raising_drops_the_link() -> None:
    from panoramisk import Manager

    loop = asyncio.get_running_loop()
    created: list[str] = []
    errors: list[dict[str, Any]] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any],
                **kw: Any) -> asyncio.Task[Any]:
        created.append(getattr(coro, "__qualname__", ""))
        return asyncio.Task(coro, loop=loop, **kw)

    ran: dict[str, asyncio.Event] = {n: asyncio.Event() for n in ("plain", "coro", "acrash")}
    in_task: list[asyncio.Task[Any] | None] = []

    def plain(_m: object, _e: object) -> None:
        in_task.append(asyncio.current_task())
        ran["plain"].set()

    async def coro(_m: object, _e: object) -> None:
        ran["coro"].set()

    async def acrash(_m: object, _e: object) -> None:
        ran["acrash"].set()
        raise KeyError("in an async callback")

    def crash(_m: object, _e: object) -> None:
        raise KeyError("in a plain callback")

    peer = AmiPeer()
    await peer.start()
    manager = Manager(host="127.0.0.1", port=peer.port, username="prepaid", secret="s",
                      ping_delay=60, reconnect_timeout=60, loop=loop)
    lost: list[object] = []
    gone = asyncio.Event()

    def on_disconnect(_m: object, exc: object) -> None:
        lost.append(exc)
        gone.set()

    manager.on_disconnect = on_disconnect
    for name, callback in (("Hangup", plain), ("Newchannel", coro), ("VarSet", acrash),
                           ("Cdr", crash)):
        manager.register_event(name, callback)
    loop.set_task_factory(factory)  # type: ignore[arg-type]
    loop.set_exception_handler(lambda _l, context: errors.append(context))
    try:
        async with asyncio.timeout(5):
            await manager.connect()
            await peer.logged_in.wait()
            created.clear()
            # A plain callback is called inside data_received, outside any task: no task.
            await peer.event("Hangup")
            await ran["plain"].wait()
            assert in_task == [None] and created == []
            # An async one becomes a task per event that the Manager does not keep.
            await peer.event("Newchannel")
            await ran["coro"].wait()
            assert [name.rsplit(".", 1)[-1] for name in created] == ["coro"]
            # An async callback that raises leaves the link up: its error is in that task.
            await peer.event("VarSet")
            await ran["acrash"].wait()
            ran["plain"].clear()
            await peer.event("Hangup")
            await ran["plain"].wait()
            assert not peer.eof.is_set() and not lost
            # A plain callback that raises ends data_received, and asyncio closes the link.
            await peer.event("Cdr")
            await peer.eof.wait()
            await gone.wait()  # the Manager saw it too (and would reconnect)
    finally:
        loop.set_task_factory(None)
        loop.set_exception_handler(None)
        manager.close()
        await peer.stop()
    gc.collect()
    messages = [c.get("message", "") for c in errors]
    assert "Task exception was never retrieved" in messages  # the async callback's KeyError
    fatal = [c for c in errors if "data_received() call failed" in c.get("message", "")]
    assert len(fatal) == 1 and isinstance(fatal[0]["exception"], KeyError)


# -- panoramisk: fast_agi ------------------------------------------------------------------

@pano14
async def test_fast_agi_only_sync_routes_hit_asyncio_coroutine() -> None:
    from panoramisk.fast_agi import Application

    app = Application(loop=asyncio.get_running_loop())
    results: list[dict[str, Any]] = []

    async def authorize(request: Any) -> None:
        results.append(await request.send_command("GET VARIABLE ACCOUNTCODE"))

    def sync_route(_request: Any) -> None:
        pass

    app.add_route("authorize", authorize)
    with pytest.raises(AttributeError, match="module 'asyncio' has no attribute 'coroutine'"):
        app.add_route("sync", sync_route)  # fast_agi.py:100-101, removed in Python 3.11
    assert list(app._route) == ["authorize"]

    server = await asyncio.start_server(app.handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(AGI_ENV)
            assert await reader.readline() == b"GET VARIABLE ACCOUNTCODE\n"
            writer.write(b"200 result=1 (1001)\n")
            assert await reader.read() == b""  # the route ended and the server closed
            writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert results[0]["status_code"] == 200 and results[0]["result"] == ("1", "1001")


class Released(Exception):
    """Set on the stuck reader by the watchdog, to end fast_agi's header loop."""


@pano14
async def test_fast_agi_header_loop_on_a_half_closed_client_blocks_the_whole_loop() -> None:
    from panoramisk.fast_agi import Application

    loop = asyncio.get_running_loop()
    app = Application(loop=loop)
    readers: list[asyncio.StreamReader] = []
    released: list[Released] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        readers.append(reader)
        try:
            await app.handler(reader, writer)  # the real header loop, fast_agi.py:145-147
        except Released as exc:
            released.append(exc)
            writer.close()

    ticks = 0

    async def heartbeat() -> None:  # another coroutine on the same loop
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    beating = asyncio.create_task(heartbeat())
    report: dict[str, float] = {}
    done = asyncio.Event()

    def frozen_for(hold: float, within: float) -> float | None:
        """Seconds from the half-close until ticks stop for `hold` s, or None within `within`."""
        start = time.monotonic()
        last, since = ticks, time.monotonic()
        while (now := time.monotonic()) - start < within:
            if ticks != last:
                last, since = ticks, now
            elif now - since >= hold:
                return since - start
            time.sleep(0.005)
        return None

    def watchdog() -> None:  # a thread: it runs while the loop is stuck
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                client.sendall(AGI_ENV[:CUT])  # part of the headers, no blank line
                # Stalled but open: only its own handler waits, the loop runs on.
                report["stalled_froze"] = float(frozen_for(hold=0.5, within=1.5) is not None)
                report["handlers"] = len(readers)
                client.shutdown(socket.SHUT_WR)  # half-closed: read() returns b"" at once
                froze = frozen_for(hold=1.0, within=5.0)
                report["froze_after"] = -1.0 if froze is None else froze
                report["ticks_while_frozen"] = ticks
                if readers:
                    readers[0].set_exception(Released())  # its next read() raises
                report["resumed"] = float(frozen_for(hold=0.5, within=1.5) is None)
        finally:
            loop.call_soon_threadsafe(done.set)

    thread = threading.Thread(target=watchdog, daemon=True)
    try:
        thread.start()
        async with asyncio.timeout(15):
            await done.wait()
    finally:
        thread.join(10)
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
        server.close()
        await server.wait_closed()
    assert report["stalled_froze"] == 0.0 and report["handlers"] == 1, report
    assert 0 <= report["froze_after"] < 1.0, report  # stopped at once, held 1 s, not freed
    assert len(released) == 1, "the handler left only through the released read()"
    assert report["resumed"] == 1.0 and ticks > report["ticks_while_frozen"]


# -- pyst2 -----------------------------------------------------------------------------------

@pytest.fixture
def sighup() -> Iterator[None]:
    """pyst2's AGI() installs its own SIGHUP handler; give the test process its own back."""
    old = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, old)


@contextlib.contextmanager
def pipes(given: bytes) -> Iterator[tuple[IO[str], IO[str], IO[str]]]:
    """(stdin, stdout, read end of stdout): `given` already written to stdin, then EOF."""
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    os.write(w_in, given)
    os.close(w_in)
    with (os.fdopen(r_in) as stdin, os.fdopen(w_out, "w") as stdout,
          os.fdopen(r_out) as sent):
        yield stdin, stdout, sent


@pyst051
def test_pyst2_fastagi_does_not_import_on_python3() -> None:
    with pytest.raises(ModuleNotFoundError, match="No module named 'SocketServer'"):
        import asterisk.fastagi  # noqa: F401  fastagi.py:17, Python 2's module name


@pyst051
def test_pyst2_agi_takes_file_objects_only_in_the_main_thread(sighup: None) -> None:
    from asterisk.agi import AGI

    with pipes(AGI_ENV + b"200 result=1\n") as (stdin, stdout, sent):
        failed: list[BaseException] = []

        def in_a_thread() -> None:
            try:
                AGI(stdin=stdin, stdout=stdout, stderr=io.StringIO())
            except BaseException as exc:  # what it raises is the measurement
                failed.append(exc)

        thread = threading.Thread(target=in_a_thread)
        thread.start()
        thread.join(5)
        assert [type(e) for e in failed] == [ValueError]
        assert str(failed[0]) == "signal only works in main thread of the main interpreter"

        agi = AGI(stdin=stdin, stdout=stdout, stderr=io.StringIO())  # main thread: it works
        assert agi.env["agi_channel"] == "PJSIP/1001-00000001"
        assert agi.execute("ANSWER") == {"result": ("1", "")}
        stdout.flush()
        assert sent.readline() == "ANSWER\n"
        assert signal.getsignal(signal.SIGHUP) == agi._handle_sighup  # the process's, now

    # Binary file objects (a socket's makefile, what fastagi.py:32 would hand it): the
    # headers are read, the first command is written as str and fails.
    ours, theirs = socket.socketpair()
    with ours, theirs, ours.makefile("rb") as rfile, ours.makefile("wb") as wfile:
        theirs.sendall(AGI_ENV)
        agi = AGI(stdin=rfile, stdout=wfile, stderr=io.StringIO())
        assert agi.env["agi_network_script"] == "authorize"
        with pytest.raises(TypeError, match="a bytes-like object is required, not 'str'"):
            agi.execute("ANSWER")


@pyst051
def test_pyst2_agi_eof_mid_dialogue_is_a_valueerror_not_a_hangup(sighup: None) -> None:
    from asterisk.agi import AGI, AGIHangup

    with pipes(AGI_ENV + b"200 result=1\n") as (stdin, stdout, _):  # then Asterisk is gone
        agi = AGI(stdin=stdin, stdout=stdout, stderr=io.StringIO())
        assert agi.execute("ANSWER") == {"result": ("1", "")}
        with pytest.raises(ValueError, match="invalid literal for int") as caught:
            agi.execute("GET VARIABLE ACCOUNTCODE")  # agi.py:173-180: int("")
        assert not isinstance(caught.value, AGIHangup)


@pyst051
def test_pyst2_agi_takes_a_truncated_header_block_as_complete(sighup: None) -> None:
    from asterisk.agi import AGI

    with pipes(AGI_ENV[:CUT]) as (stdin, stdout, _):  # EOF inside a value, no blank line
        agi = AGI(stdin=stdin, stdout=stdout, stderr=io.StringIO())  # no error
    assert agi.env == {"agi_network": "yes", "agi_network_script": "authorize",
                       "agi_channel": "PJSIP"}  # agi.py:113: EOF's "" taken for the blank line


CHILD = """
import sys
from asterisk.agi import AGI, AGIUsageError
agi = AGI(stderr=open("/dev/null", "w"))
try:
    agi.execute("GET VARIABLE")
except AGIUsageError:
    raise SystemExit(3)
"""


def _usage(pid: int) -> tuple[float, int]:
    """(CPU seconds, resident kB) of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    rss = next(int(line.split()[1]) for line in
               Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), rss  # utime+stime


@pyst051
def test_pyst2_agi_520_replies(sighup: None) -> None:
    from asterisk.agi import AGI, AGIUsageError

    # The multi-line form, complete, is read up to its "520 End of proper usage.".
    with pipes(AGI_ENV + USAGE_MANY) as (stdin, stdout, _):
        agi = AGI(stdin=stdin, stdout=stdout, stderr=io.StringIO())
        with pytest.raises(AGIUsageError, match="End of proper usage"):
            agi.execute("GET VARIABLE")

    # The one-line form: pyst2 waits for a second 520 line that never comes (agi.py:197-206),
    # while Asterisk waits for its next command.  Once Asterisk hangs up it spins on EOF.
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    try:
        child.stdin.write(AGI_ENV)
        child.stdin.flush()
        assert child.stdout.readline() == b"GET VARIABLE\n"
        child.stdin.write(USAGE_ONE)
        child.stdin.flush()
        before = _usage(child.pid)
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=1.5)  # bounded: a right reader would have exited with 3
        blocked = _usage(child.pid)
        child.stdin.close()  # the hangup
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=1.5)
        spun = _usage(child.pid)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert blocked[0] - before[0] <= 0.05 and blocked[1] - before[1] < 1024  # in readline
    # Busy: readline() at EOF returns "" at once, and each "" is appended to the usage list.
    assert spun[0] - blocked[0] >= 0.1 and spun[1] - blocked[1] >= 256
