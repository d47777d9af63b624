"""``prepaid serve`` as an admin runs it: one process per service under a supervisor.

The real command in a subprocess, a real Redis, FastAGI calls over the wire. Metering
health is not what these tests are about (tests/test_agi_metering.py is): the config lets
calls through unmetered, and AMI points at a closed port, so the AMI child just retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest

from prepaid import config, metrics
from prepaid.ledger import Ledger
from prepaid.ratedeck import parse_csv
from prepaid.ratestore import RateStore
from prepaid.store import Store
from shell import serve
from testbed.agi_peer import AgiPeer, agi_env
from testbed.servers import free_port
from tests.test_agi_fastagi import DECK

T = TypeVar("T")
PREPAID = str(Path(sys.executable).parent / "prepaid")
SERVICES = ("agi", "ami", "policy")


async def until(check: Callable[[], Awaitable[T | None] | T | None], what: str,
                within: float = 20.0) -> T:
    deadline = time.monotonic() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value is not None and value is not False:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)


def write_config(path: Path, redis_url: str, agi_port: int, metrics_port: int | None = None,
                 extra: str = "") -> Path:
    text = (f'[redis]\nurl = "{redis_url}"\n'
            f'[agi]\nlisten = "127.0.0.1:{agi_port}"\nallow_unmetered = true\n{extra}'
            f'[ami]\nport = {free_port()}\nreconnect_max_seconds = 1.0\n')
    if metrics_port is not None:
        text += f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
    path.write_text(text)
    return path


_refs = itertools.count(1)


async def authorize(agi_port: int, within: float = 15.0) -> str:
    """One FastAGI authorization for account 1001; its PREPAID_STATUS."""
    ref = f"s{os.getpid()}.{next(_refs)}"
    peer = AgiPeer(agi_env(ref, "00491701234567", callerid="1001", port=agi_port),
                   variables={"CHANNEL(linkedid)": ref})
    await peer.call(agi_port, within=within)
    return peer.set_vars.get("PREPAID_STATUS", "")


@dataclass
class Serve:
    proc: subprocess.Popen[bytes]
    log: Path
    agi_port: int
    metrics_port: int | None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> dict[str, list[int]]:
        """Every pid each service was started as, in order."""
        out: dict[str, list[int]] = {}
        for name, pid in re.findall(r"service (\w+) started \(pid (\d+)\)", self.text()):
            out.setdefault(name, []).append(int(pid))
        return out

    async def started(self, counts: dict[str, int]) -> dict[str, list[int]]:
        def check() -> dict[str, list[int]] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.text()}")
            kids = self.children()
            ok = all(len(kids.get(n, [])) >= c for n, c in counts.items())
            return kids if ok else None
        return await until(check, f"children {counts}\n{self.text()}")

    async def authorize(self) -> str:
        return await authorize(self.agi_port)


def gone(pid: int) -> bool:
    """Exited (a zombie counts: nobody may have reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    out = {}
    for line in body.decode().splitlines():
        if line.startswith("prepaid_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def spawn_serve(conf: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([PREPAID, "--config", str(conf), "serve", *args], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


@pytest.fixture
async def seeded(redis_url: str, ledger: Ledger) -> str:
    await RateStore(ledger.redis).replace(parse_csv(DECK))
    await ledger.create_account("1001", currency="EUR")
    await ledger.credit("1001", 100_000_000, key="seed")
    return redis_url


@pytest.fixture
async def running(seeded: str, tmp_path: Path) -> AsyncIterator[Serve]:
    agi_port, metrics_port = free_port(), free_port()
    conf = write_config(tmp_path / "prepaid.toml", seeded, agi_port, metrics_port)
    log = tmp_path / "serve.log"
    proc = spawn_serve(conf, log)
    s = Serve(proc, log, agi_port, metrics_port)
    try:
        yield s
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for pids in s.children().values():
            for pid in pids:
                if not gone(pid):
                    os.kill(pid, signal.SIGKILL)


async def test_each_service_runs_in_its_own_process_and_a_killed_one_is_restarted(
        running: Serve) -> None:
    kids = await running.started({n: 1 for n in SERVICES})
    pids = {n: kids[n][0] for n in SERVICES}
    assert len(set(pids.values()) | {running.proc.pid}) == 4
    await until(lambda: "FastAGI listening on" in running.text(), "FastAGI listening")
    assert await running.authorize() == "ALLOWED"

    os.kill(pids["agi"], signal.SIGKILL)
    # The supervisor holds the listening socket: this call waits in the kernel's queue and
    # is served by the next AGI process, not refused.
    assert await running.authorize() == "ALLOWED"
    kids = await running.started({"agi": 2})
    assert kids["agi"][1] != pids["agi"]
    assert kids["ami"] == [pids["ami"]] and kids["policy"] == [pids["policy"]]
    text = running.text()
    assert text.count(f"service agi (pid {pids['agi']}) was killed by SIGKILL; "
                      "restarting it in 0.5 s") == 1
    assert "Traceback" not in text

    assert running.metrics_port is not None
    got = await asyncio.to_thread(scrape, running.metrics_port)
    assert got['prepaid_service_restarts_total{service="agi"}'] == 1
    # Counted by two AGI processes, one of them dead: the supervisor still adds both.
    assert got['prepaid_authorizations_total{reason="",status="ALLOWED"}'] == 2
    assert got['prepaid_dependency_up{dependency="redis"}'] == 1

    began = time.monotonic()
    running.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(running.proc.wait, 20) == 0
    assert time.monotonic() - began < serve.STOP_SECONDS + 5
    for pid in (*pids.values(), kids["agi"][1]):
        assert gone(pid)
    assert running.text().rstrip().endswith("INFO shell.serve: stopped")


async def test_children_exit_by_themselves_when_the_supervisor_is_sigkilled(
        running: Serve, seeded: str, tmp_path: Path) -> None:
    kids = await running.started({n: 1 for n in SERVICES})
    await until(lambda: "FastAGI listening on" in running.text(), "FastAGI listening")
    os.kill(running.proc.pid, signal.SIGKILL)  # the supervisor only, not its group
    running.proc.wait(10)
    began = time.monotonic()
    for name in SERVICES:
        await until(partial(gone, kids[name][0]), f"{name} child exiting", 15)
    assert time.monotonic() - began < 15
    # No listener is left behind: a new serve binds the same port and serves.
    conf = write_config(tmp_path / "again.toml", seeded, running.agi_port)
    log = tmp_path / "again.log"
    again = spawn_serve(conf, log, "--only", "agi")
    try:
        s = Serve(again, log, running.agi_port, None)
        await until(lambda: "FastAGI listening on" in s.text() or again.poll() is not None,
                    "the second serve")
        assert again.poll() is None, s.text()
        assert await s.authorize() == "ALLOWED"
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(20) == 0


@pytest.mark.parametrize("only", [(), ("agi",)])
@pytest.mark.parametrize("what", ["agi port", "metrics port", "allow entry"])
def test_serve_exits_non_zero_with_one_clear_line_when_it_cannot_serve(
        redis_url: str, tmp_path: Path, what: str, only: tuple[str, ...]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agi_port = port if what == "agi port" else free_port()
        metrics_port = port if what == "metrics port" else free_port()
        extra = 'allow = ["10.0.0.0/33"]\n' if what == "allow entry" else ""
        conf = write_config(tmp_path / "p.toml", redis_url, agi_port, metrics_port, extra)
        res = subprocess.run([PREPAID, "--config", str(conf), "serve",
                              *[x for n in only for x in ("--only", n)]],
                             capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    err = res.stderr.decode()
    assert res.returncode == 1, err
    assert "Traceback" not in err and "started (pid" not in err
    [line] = [x for x in err.splitlines() if x.startswith("prepaid: error:")]
    expected = {
        "agi port": f"prepaid: error: cannot listen for FastAGI on [agi] listen "
                    f"'127.0.0.1:{agi_port}': address already in use",
        "metrics port": f"prepaid: error: cannot serve metrics on [metrics] listen "
                        f"'127.0.0.1:{metrics_port}': address already in use",
        "allow entry": f"prepaid: error: {conf}: [agi] allow entry '10.0.0.0/33' is not an "
                       "address or network like 127.0.0.1 or 10.0.0.0/8",
    }
    assert line == expected[what]


def test_settings_cross_to_a_child_intact() -> None:
    settings = config.parse({"agi": {"allow": ["127.0.0.1/32"], "metering_stale_seconds": 2.5},
                             "billing": {"rates": "/tmp/rates.csv"},
                             "policy": {"presets": ["5.00", "10"]}}, "/etc/p.toml", env={})
    spec = serve.ChildSpec("agi", settings, "DEBUG", (3,))
    assert pickle.loads(pickle.dumps(spec)) == spec


def test_back_off_doubles_up_to_the_cap() -> None:
    assert [serve.backoff(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert serve.backoff(20) == serve.BACKOFF_MAX


async def test_in_process_a_failing_service_is_restarted_and_the_others_keep_serving(
        seeded: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The in-process runner (``serve --only``, the e2e tests) isolates failures too."""
    runs = 0

    async def flaky(store: Store, stop: asyncio.Event) -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise RuntimeError(f"bad record {runs}")
        await stop.wait()

    monkeypatch.setitem(serve.SERVICES, "policy", flaky)
    agi_port = free_port()
    settings = config.parse({"redis": {"url": seeded},
                             "agi": {"listen": f"127.0.0.1:{agi_port}",
                                     "allow_unmetered": True}}, "<test>", env={})
    def restarts() -> float:
        return metrics.SERVE_REGISTRY.get_sample_value(
            "prepaid_service_restarts_total", {"service": "policy"}) or 0.0

    before = restarts()
    stop = asyncio.Event()
    task = asyncio.create_task(serve.run_services(settings, ["agi", "policy"], stop))
    try:
        await until(lambda: runs >= 3 or task.done(), "the third start of the policy service")
        assert not task.done()
        assert await authorize(agi_port) == "ALLOWED"
        assert restarts() - before == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert errors == ["service policy failed; restarting it in 0.5 s",
                          "service policy failed; restarting it in 1.0 s"]  # one per failure
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@pytest.mark.parametrize("only", [(), ("ami",)])
def test_serve_refuses_the_sample_ami_secret_without_printing_it(
        redis_url: str, tmp_path: Path, only: tuple[str, ...]) -> None:
    conf = write_config(tmp_path / "p.toml", redis_url, free_port())
    env = {**os.environ, "PREPAID_AMI_SECRET": serve.SAMPLE_AMI_SECRET}
    res = subprocess.run([PREPAID, "--config", str(conf), "serve",
                          *[x for n in only for x in ("--only", n)]],
                         capture_output=True, timeout=60, stdin=subprocess.DEVNULL, env=env)
    out = res.stdout.decode() + res.stderr.decode()
    assert res.returncode == 1, out
    assert "Traceback" not in out and "started (pid" not in out
    assert serve.SAMPLE_AMI_SECRET not in out
    [line] = [x for x in out.splitlines() if x.startswith("prepaid: error:")]
    assert line == ("prepaid: error: [ami] secret is the sample one of asterisk-conf/"
                    "manager.conf: set a secret of your own there and in PREPAID_AMI_SECRET")
