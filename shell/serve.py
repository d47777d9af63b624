"""``prepaid serve``: each service in its own OS process under a supervisor; one service alone
(``--only ami``) runs in this process.

Why processes: on one event loop a flood of AMI events delayed every authorization (163 ms
p50 at 120 calls/s). Each child has its own interpreter and loop, so metering load, a slow
policy worker or a crash in either never touches the FastAGI server.

The supervisor
- binds the FastAGI sockets and the metrics port itself, first, so "cannot serve" (a port
  taken, a bad ``[agi] allow`` entry) is one clear error and a non-zero exit before anything
  starts; the AGI child inherits the sockets, so while it restarts, calls wait in the kernel's
  accept queue instead of being refused;
- restarts a child that dies, with exponential back-off, logged once per failure and counted
  in ``prepaid_service_restarts_total{service}``;
- on SIGTERM/SIGINT closes each child's stdin: the child sets its stop event and has 10 s to
  finish before it is killed;
- serves /metrics alone (prepaid/metrics.py: the children write prometheus_client's
  multiprocess files), and refreshes the dependency-health gauges.

Children are ``subprocess`` runs of this same interpreter (``python -c``), not
multiprocessing: the child is a fresh interpreter either way (no inherited Redis sockets,
threads or locks), but subprocess does not re-import the parent's ``__main__`` (the console
script, or pytest) as the "spawn" start method does, and the one pipe it gives, stdin,
carries the pickled Settings and then stays open: its EOF is how a child learns that the
supervisor is gone, even SIGKILLed, so a restarted ``prepaid serve`` never finds an old AGI
child still listening. The child reads it in a thread, not on its event loop, and exits
within 10 s even if that loop is stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import multiprocess

import agi.server
import ami_listener.service
import policy.phone
import policy.web.app
from prepaid import archive, health, metrics
from prepaid.config import Settings
from prepaid.errors import ServeError
from prepaid.store import Store, open_store

log = logging.getLogger(__name__)
T = TypeVar("T")

Runner = Callable[[Store, asyncio.Event], Coroutine[Any, Any, None]]


async def _policy(store: Store, stop: asyncio.Event) -> None:
    """The policy service, and the daily archive when ``[archive] daily`` is set."""
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(policy.phone.serve(store, stop))
        if store.settings.archive.daily:
            tasks.create_task(archive.daily(store.ledger, store.settings.archive, stop),
                              name="archive")


SERVICES: dict[str, Runner] = {"agi": agi.server.run, "ami": ami_listener.service.run,
                               "policy": _policy, "web": policy.web.app.run}
# The services that take listening sockets the supervisor bound.
_LISTENERS: dict[str, Callable[..., Coroutine[Any, Any, None]]] = {
    "agi": agi.server.run, "web": policy.web.app.run}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
STOP_SECONDS = 10.0  # a child asked to stop is killed after this
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STABLE_SECONDS = 60.0  # a child that ran this long restarts after BACKOFF_FIRST again
_CHILD = "import shell.serve as s; s.child_main()"
_ROOT = str(Path(__file__).resolve().parent.parent)  # where the packages are imported from


def configure_logging(level: str) -> None:
    """The one logging set-up of ``prepaid serve``; each child calls it the same way."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


def default_services(settings: Settings) -> tuple[str, ...]:
    """What ``prepaid serve`` runs without ``--only``: the web page too once
    ``[web] listen`` is set."""
    return ("agi", "ami", "policy", *(("web",) if settings.web.listen else ()))


def backoff(failures: int) -> float:
    return float(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, failures - 1)))


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


async def _wait_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


# -- what has to succeed before anything runs --------------------------------------------

@dataclass
class Prepared:
    """The sockets and the metrics server ``serve`` holds for its whole life."""

    agi_socks: list[socket.socket] = field(default_factory=list)
    web_socks: list[socket.socket] = field(default_factory=list)
    metrics_server: Any = None
    multiprocess_dir: str | None = None

    def socks(self, name: str) -> list[socket.socket]:
        return {"agi": self.agi_socks, "web": self.web_socks}.get(name, [])

    def close(self) -> None:
        for sock in [*self.agi_socks, *self.web_socks]:
            sock.close()
        self.agi_socks = []
        self.web_socks = []
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
        if self.multiprocess_dir is not None:
            shutil.rmtree(self.multiprocess_dir, ignore_errors=True)
            self.multiprocess_dir = None


_METRICS_DIR = "prepaid-metrics-"  # + the supervisor's pid: see _remove_orphaned_metrics


def _remove_orphaned_metrics() -> None:
    """A supervisor that was SIGKILLed could not remove its metrics directory: remove those
    whose supervisor is gone."""
    for path in Path(tempfile.gettempdir()).glob(f"{_METRICS_DIR}*-*"):
        try:
            pid = int(path.name[len(_METRICS_DIR):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError):
            continue  # not ours, or another user's live supervisor


# The placeholder of asterisk-conf/manager.conf: everyone who read the file knows it.
SAMPLE_AMI_SECRET = "change-me"


def prepare(settings: Settings, names: Sequence[str], *, multiprocess: bool) -> Prepared:
    """Check the AMI secret and the allow list, bind FastAGI and serve metrics; ServeError/
    ConfigError if not."""
    if "ami" in names and settings.ami.secret.strip() == SAMPLE_AMI_SECRET:
        raise ServeError("[ami] secret is the sample one of asterisk-conf/manager.conf: set a "
                         "secret of your own there and in PREPAID_AMI_SECRET")
    prepared = Prepared()
    try:
        if "agi" in names:
            agi.server.parse_allow(settings.agi.allow)
            prepared.agi_socks = agi.server.bind(settings.agi)
        if "web" in names:
            prepared.web_socks = policy.web.app.bind(settings)
        listen = settings.metrics.listen
        if listen:
            if multiprocess:
                _remove_orphaned_metrics()
                prepared.multiprocess_dir = tempfile.mkdtemp(
                    prefix=f"{_METRICS_DIR}{os.getpid()}-")
            try:
                prepared.metrics_server = metrics.serve_metrics(
                    listen, multiprocess_dir=prepared.multiprocess_dir)
            except OSError as exc:
                raise ServeError(f"cannot serve metrics on [metrics] listen {listen!r}: "
                                 f"{(exc.strerror or str(exc)).lower()}") from None
            log.info("metrics on http://%s/metrics", listen)
    except BaseException:
        prepared.close()
        raise
    return prepared


def _runner(name: str, prepared: Prepared) -> Runner:
    """The service's run(); the AGI one on duplicates of the bound sockets (its server closes
    them when it stops; the originals stay open for the next start)."""
    if name in _LISTENERS and prepared.socks(name):
        return functools.partial(_LISTENERS[name], socks=[s.dup() for s in prepared.socks(name)])
    return SERVICES[name]


# -- one process: a single service, or the tests' in-process stack -------------------------

async def _keep_in_process(name: str, prepared: Prepared, store: Store,
                           stop: asyncio.Event) -> None:
    failures = 0
    while not stop.is_set():
        started = time.monotonic()
        error: Exception | None = None
        try:
            await _runner(name, prepared)(store, stop)
        except Exception as exc:
            error = exc
        if stop.is_set():
            if error is not None:
                log.error("service %s failed while stopping: %r", name, error)
            return
        failures = 1 if time.monotonic() - started >= STABLE_SECONDS else failures + 1
        delay = backoff(failures)
        metrics.SERVICE_RESTARTS.labels(name).inc()
        # One line (with the traceback) per failure.
        log.error("service %s %s; restarting it in %.1f s", name,
                  "failed" if error is not None else "returned by itself", delay,
                  exc_info=error)
        await _wait_or_stop(stop, delay)


async def run_services(settings: Settings, names: Sequence[str], stop: asyncio.Event) -> None:
    """Run each service in this process until ``stop``; one that fails is restarted with
    back-off and never stops the others."""
    names = list(dict.fromkeys(names))
    prepared = prepare(settings, names, multiprocess=False)
    store = await open_store(settings, check=False)
    tasks: dict[asyncio.Task[None], str] = {
        asyncio.create_task(_keep_in_process(name, prepared, store, stop),
                            name=f"prepaid-{name}"): name for name in names}
    if prepared.metrics_server is not None:
        tasks[asyncio.create_task(health.export_forever(store.redis, settings, stop),
                                  name="prepaid-health")] = "health"
    log.info("serving %s (config %s, Redis %s)", ", ".join(names), settings.source,
             settings.redis.safe_url)
    try:
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        # Wait for them, so no service writes to Redis after serve has returned.
        _, stuck = await asyncio.wait(tasks, timeout=STOP_SECONDS)
        for task in stuck:
            log.error("service %s did not stop within %.0f s", tasks[task], STOP_SECONDS)
        await store.close()
        prepared.close()
    log.info("stopped")


# -- several: one child process each ---------------------------------------------------------

@dataclass(frozen=True)
class ChildSpec:
    """What the supervisor sends a child on its stdin (pickled: Settings is a frozen
    dataclass of plain values)."""

    name: str
    settings: Settings
    log_level: str
    fds: tuple[int, ...] = ()  # the AGI's (or the web page's) listening sockets, inherited


class Supervisor:
    def __init__(self, settings: Settings, names: Sequence[str], log_level: str,
                 prepared: Prepared) -> None:
        self.settings, self.names, self.log_level = settings, list(names), log_level
        self.prepared = prepared
        self.pids: dict[str, int] = {}  # the running child of each service

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        for var in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"):
            env.pop(var, None)
        if self.prepared.multiprocess_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = self.prepared.multiprocess_dir
        # The same code as this process, wherever the child's working directory is.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
        return env

    async def _spawn(self, name: str) -> asyncio.subprocess.Process:
        fds = tuple(s.fileno() for s in self.prepared.socks(name))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CHILD, stdin=asyncio.subprocess.PIPE, pass_fds=fds,
            env=self._env())
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps(ChildSpec(name, self.settings, self.log_level, fds)))
        with contextlib.suppress(ConnectionError):  # died at once: seen by wait()
            await proc.stdin.drain()
        return proc

    async def _stop_child(self, name: str, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()  # EOF: the child sets its stop event
            try:
                await asyncio.wait_for(proc.wait(), STOP_SECONDS)
            except TimeoutError:
                log.error("service %s (pid %s) did not stop within %.0f s; killing it", name,
                          proc.pid, STOP_SECONDS)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    def _child_gone(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.pids.pop(name, None)
        if self.prepared.multiprocess_dir is not None:
            # Its 'live' gauges (live calls, outbox lag) leave the sum; counters stay.
            multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                proc.pid, self.prepared.multiprocess_dir)

    async def keep(self, name: str, stop: asyncio.Event) -> None:
        """Run service ``name`` in a child until ``stop``; restart it when it dies."""
        failures = 0
        while not stop.is_set():
            started = time.monotonic()
            try:
                proc = await self._spawn(name)
            except OSError as exc:  # fork or exec refused: as if it had died at once
                failures += 1
                delay = backoff(failures)
                log.error("service %s could not be started: %s; trying again in %.1f s",
                          name, exc, delay)
                await _wait_or_stop(stop, delay)
                continue
            self.pids[name] = proc.pid
            log.info("service %s started (pid %s)", name, proc.pid)
            ended = asyncio.ensure_future(proc.wait())
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait((ended, stopping), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
                if not ended.done():
                    ended.cancel()
                    await self._stop_child(name, proc)
                self._child_gone(name, proc)
            if stop.is_set():
                return
            failures = 1 if time.monotonic() - started >= STABLE_SECONDS else failures + 1
            delay = backoff(failures)
            metrics.SERVICE_RESTARTS.labels(name).inc()
            log.error("service %s (pid %s) %s; restarting it in %.1f s", name, proc.pid,
                      _exit_text(proc.returncode or 0), delay)
            await _wait_or_stop(stop, delay)

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [asyncio.create_task(self.keep(name, stop), name=f"supervise-{name}")
                 for name in self.names]
        store: Store | None = None
        if self.prepared.metrics_server is not None:
            store = await open_store(self.settings, check=False)
            tasks.append(asyncio.create_task(
                health.export_forever(store.redis, self.settings, stop), name="health"))
        log.info("serving %s in %s processes (config %s, Redis %s)", ", ".join(self.names),
                 len(self.names), self.settings.source, self.settings.redis.safe_url)
        try:
            await asyncio.gather(*tasks)
        finally:
            stop.set()
            # Each keep() stops its child (EOF, then at most STOP_SECONDS, then a kill).
            await asyncio.wait(tasks, timeout=STOP_SECONDS + 5)
            if store is not None:
                await store.close()
        log.info("stopped")


async def supervise(settings: Settings, names: Sequence[str], stop: asyncio.Event,
                    log_level: str = "INFO") -> None:
    """Run each service in its own process until ``stop``."""
    names = list(dict.fromkeys(names))
    prepared = prepare(settings, names, multiprocess=True)
    try:
        await Supervisor(settings, names, log_level, prepared).run(stop)
    finally:
        prepared.close()


# -- a child ---------------------------------------------------------------------------------

def _watch_parent(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """In a thread: wait for EOF on stdin (the supervisor closed it, or died), then stop;
    exit hard if the service is not done STOP_SECONDS later (its loop may be stuck)."""
    # The raw fd, not sys.stdin: a thread blocked in a buffered read holds its lock, and the
    # interpreter aborts at exit when it cannot take it.
    with contextlib.suppress(OSError):
        while os.read(0, 65536):
            pass
    with contextlib.suppress(RuntimeError):  # the loop has already closed
        loop.call_soon_threadsafe(stop.set)
    time.sleep(STOP_SECONDS)
    os._exit(1)


async def _child(spec: ChildSpec) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    threading.Thread(target=_watch_parent, args=(loop, stop), name="parent-watch",
                     daemon=True).start()
    runner = SERVICES[spec.name]
    if spec.name in _LISTENERS and spec.fds:
        runner = functools.partial(_LISTENERS[spec.name],
                                   socks=[socket.socket(fileno=fd) for fd in spec.fds])
    store = await open_store(spec.settings, check=False)
    try:
        await runner(store, stop)
    except Exception:
        log.exception("service %s failed", spec.name)
        return 1
    finally:
        await store.close()
    if not stop.is_set():
        log.error("service %s stopped by itself", spec.name)
        return 1
    return 0


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when it is installed (the ``fast`` extra) and ``PREPAID_LOOP`` is not
    ``asyncio``; else asyncio's own loop (None)."""
    if os.environ.get("PREPAID_LOOP", "auto") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    factory = loop_factory()
    if factory is None:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def child_main() -> None:
    """Entry of a child process (see the module docstring)."""
    spec = pickle.load(sys.stdin.buffer)
    if not isinstance(spec, ChildSpec):
        raise SystemExit("prepaid serve: a child expects its ChildSpec on stdin")
    configure_logging(spec.log_level)
    raise SystemExit(run_loop(_child(spec)))


# -- the entry point -------------------------------------------------------------------------

def serve_forever(settings: Settings, names: Sequence[str], level: str = "INFO") -> None:
    """``prepaid serve``: one service in this process, several under a supervisor. Returns
    after SIGTERM/SIGINT; raises ServeError (exit 1) when it cannot serve."""
    configure_logging(level)
    names = list(dict.fromkeys(names))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if len(names) > 1:
            await supervise(settings, names, stop, level)
        else:
            await run_services(settings, names, stop)

    run_loop(main())
