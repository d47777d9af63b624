"""The SIP rate ramp: real SIP calls at rising rates, every call checked against Asterisk's CDR.

One Asterisk 22 with the shipped asterisk-conf/ files over real SIP (``Pbx(trunk="sip")``: the
callers are PJSIP endpoints of ``ACCOUNTS`` accounts, the shipped ``Dial(PJSIP/<n>@my-trunk)``
goes to a far-end SIPp that echoes the RTP), one ``prepaid serve`` with a config made from
asterisk-conf/prepaid.toml, one Redis. Each step offers ``rate`` calls a second for
``STEP_SECONDS`` s, calls of 3 to 15 s (the caller hangs up) streaming RTP, 1/1 billing. The
ramp stops at the first step where Asterisk itself saturates: more than ``SATURATED`` of the
calls failed in SIPp or were never answered, or the machine's CPU was pegged with Asterisk
taking a whole core of it.

Per step: calls/s offered, peak calls up (Asterisk's `core show channels count`, sampled each
second), authorization p50/p99 as Asterisk saw it (the AGI() step to the next step in its log),
calls misbilled against cdr_csv's Master.csv (the charges in the ledger differ from the rate
deck's cost of the CDR billsec, or an answered call was not charged), callers refused
(answered by the AGI with a prompt instead of being dialed), holds left once the step's calls
are settled, Asterisk's CPU and the machine's.

``python -m bench sip_ramp`` (part of ``make bench``); ``python -m bench.sip_ramp --rates 20
--seconds 5`` for a short run. ``PREPAID_BENCH_SIP_RATES`` (e.g. "20,40") and
``PREPAID_BENCH_SIP_SECONDS`` change the ramp for ``python -m bench``. Needs root (Asterisk
runs chrooted), else it is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import percentile
from prepaid.callrecord import record_key
from prepaid.config import Settings, parse
from prepaid.ratedeck import parse_csv
from prepaid.rating import cost
from prepaid.store import Store, open_store
from testbed.pbx import PROJECT_CONF, Cdr, Pbx, free_port, pbx_unavailable_reason, project_ami_user
from testbed.servers import RedisServer, toml_text
from testbed.sipload import CallSpec, FarEnd, LoadResult, agi_latencies, channels_up, start_calls

log = logging.getLogger(__name__)

RATES = (10, 50, 100, 200)  # calls offered a second, one step each
STEP_SECONDS = 30  # how long each rate is offered
HOLDS_MS = (3000, 6000, 9000, 15000)  # the callers hang up after this, in turn
ACCOUNTS = 100
OPENING = 1_000_000_000  # 1000.00 each: no call is ever short of credit
SATURATED = 0.03  # failed or unanswered calls above this share: Asterisk is saturated
CPU_PEGGED = 0.95  # the machine's CPU busy above this share over a step: pegged, when
ASTERISK_PEGGED = 1.0  # ... Asterisk is taking at least this many cores of it
SETTLE_SECONDS = 60  # how long a step's calls may take to settle after the last one ends
RATES_CSV = """\
prefix,name,price_per_minute,connect_fee,initial_increment,increment
4420,Bench SIP 1/1,0.60,0,1,1
"""
DECK = parse_csv(RATES_CSV, "sip-ramp-rates.csv")
NUMBER = "0044201234567"
PREPAID = str(Path(sys.executable).parent / "prepaid")


@dataclass
class Step:
    rate: float
    calls: int = 0
    seconds: float = 0.0
    peak_up: int = 0
    auth_p50_ms: float = 0.0
    auth_p99_ms: float = 0.0
    auth_samples: int = 0
    dialed: int = 0
    misbilled: int = 0
    unbilled: int = 0
    refused: int = 0
    sipp: dict[str, int] = field(default_factory=dict)
    unanswered: int = 0
    holds_left: int = 0  # micro-units still held once the step's calls should be settled
    unsettled: int = 0  # dialed calls whose live-call record was not ended by then
    asterisk_cpu: float = 0.0  # share of one core over the step
    machine_busy: float = 0.0  # share of all cores over the step
    decisions: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # share of one core, by process
    examples: list[str] = field(default_factory=list)

    @property
    def saturated(self) -> str:
        bad = self.sipp.get("failed", 0) + self.sipp.get("rejected", 0) + self.unanswered
        if self.calls and bad / self.calls > SATURATED:
            return f"{bad} of {self.calls} calls failed or unanswered in SIPp"
        # The machine busy alone may be other work on it: Asterisk must be taking a core.
        if self.machine_busy >= CPU_PEGGED and self.asterisk_cpu >= ASTERISK_PEGGED:
            return (f"CPU pegged: machine {100 * self.machine_busy:.0f}% busy, Asterisk "
                    f"{100 * self.asterisk_cpu:.0f}% of a core")
        return ""

    def row(self) -> str:
        return (f"peak {self.peak_up} up, auth p50/p99 {self.auth_p50_ms:.0f}/"
                f"{self.auth_p99_ms:.0f} ms, misbilled {self.misbilled} of {self.dialed} "
                f"({self.unbilled} not charged), refused {self.refused}, holds left "
                f"{self.holds_left / 1e6:.2f} EUR, {self.unsettled} calls not settled after "
                f"{SETTLE_SECONDS} s, SIPp {self.sipp}, "
                f"Asterisk CPU {100 * self.asterisk_cpu:.0f}%, machine "
                f"{100 * self.machine_busy:.0f}%, CPU by process "
                + ", ".join(f"{k} {100 * v:.0f}%" for k, v in self.cpu.items()))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each named process now (0 for one that is gone)."""
    out: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            out[name] = cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            out[name] = 0.0
    return out


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


class Sampler:
    """Samples Asterisk's active calls once a second in a thread, keeping the peak."""

    def __init__(self, pbx: Pbx) -> None:
        self.pbx = pbx
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sip-ramp-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.peak = max(self.peak, channels_up(self.pbx))
            self._stop.wait(1.0)


class Rig:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.redis = RedisServer()
        self.agi_port = free_port(socket.SOCK_STREAM)
        self.accounts = [f"b{i:03d}" for i in range(ACCOUNTS)]
        self.pbx = Pbx(agi_port=self.agi_port, trunk="sip", sip_accounts=self.accounts)
        self.far: FarEnd | None = None
        self.serve: subprocess.Popen[bytes] | None = None
        self.settings: Settings | None = None
        self.log = work / "serve.log"

    def start(self) -> Settings:
        self.redis.start()
        self.pbx.start()
        self.far = FarEnd(self.pbx).start()
        user, secret = project_ami_user()
        # The shipped sample config; only where things are changes.
        data: dict[str, Any] = tomllib.loads((PROJECT_CONF / "prepaid.toml").read_text())
        data["redis"]["url"] = self.redis.url
        data["ami"].update(host="127.0.0.1", port=self.pbx.ami_port, username=user,
                           cdr_file=str(self.pbx.cdr_custom_path))
        data["agi"]["listen"] = f"127.0.0.1:{self.agi_port}"
        data["smtp"].update(host="127.0.0.1", port=free_port())
        config = self.work / "prepaid.toml"
        config.write_text(toml_text(data))
        config.chmod(0o600)
        self.settings = parse(data, str(config), env={"PREPAID_AMI_SECRET": secret})
        mark = len(self.pbx.log_text())
        with self.log.open("wb") as out:
            self.serve = subprocess.Popen(
                [PREPAID, "--config", str(config), "serve"], stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "PREPAID_AMI_SECRET": secret})
        self.pbx.wait_for_log(f"Manager '{user}' logged on", 30, mark)
        deadline = time.monotonic() + 20
        while f"FastAGI listening on {data['agi']['listen']}" not in self.log.read_text(
                errors="replace"):
            if time.monotonic() > deadline or self.serve.poll() is not None:
                raise RuntimeError("prepaid serve did not come up:\n"
                                   + self.log.read_text(errors="replace")[-2000:])
            time.sleep(0.05)  # polling a log with a deadline
        return self.settings

    def stop(self) -> None:
        proc = self.serve
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if self.far is not None:
            self.far.close()
        self.pbx.stop()
        self.redis.cleanup()

    def pids(self) -> dict[str, int]:
        """The processes whose CPU a step reports: Asterisk, each service of serve, Redis."""
        out: dict[str, int] = {}
        if self.pbx.proc is not None:
            out["asterisk"] = self.pbx.proc.pid
        for name, pid in re.findall(r"service (\w+) started \(pid (\d+)\)",
                                    self.log.read_text(errors="replace")):
            out[name] = int(pid)  # the latest start of each
        if self.redis.proc is not None:
            out["redis"] = self.redis.proc.pid
        return out

    def decisions(self, start: int) -> dict[str, int]:
        """Authorizations `prepaid serve` logged since offset ``start``, by outcome."""
        text = self.log.read_text(errors="replace")[start:]
        return dict(Counter(d.strip() for d in re.findall(
            r"agi\.routes: call \S+ account .*?: (\w+ ?\w*) max ", text)))


async def charges_of(store: Store, accounts: list[str]) -> tuple[dict[str, int], int]:
    """What each call reference was charged (all accounts' histories), and the holds."""
    charged: dict[str, int] = Counter()
    held = 0
    for account in accounts:
        acct = await store.ledger.get(account)
        held += acct.held
        for e in await store.ledger.history(account, 10_000_000):
            m = re.match(r"call (\S+)", e.ref)
            if m and e.amount:
                charged[m.group(1)] -= e.amount
    return dict(charged), held


async def settle(store: Store, settings: Settings, refs: list[str], accounts: list[str],
                 within: float) -> tuple[int, int]:
    """Wait (bounded) for the calls to settle; (calls not settled, holds left) at the end."""
    prefix = settings.redis.key_prefix
    deadline = time.monotonic() + within
    while True:
        open_ = 0
        for i in range(0, len(refs), 500):
            pipe = store.redis.pipeline(transaction=False)
            for ref in refs[i:i + 500]:
                pipe.hget(record_key(prefix, ref), "state")
            states = await pipe.execute()
            open_ += sum(1 for st in states if st not in (b"ended", b"released"))
        held = sum([(await store.ledger.get(a)).held for a in accounts])
        if (open_ == 0 and held == 0) or time.monotonic() > deadline:
            return open_, held
        await asyncio.sleep(0.5)  # polling the ledger with a deadline


async def one_step(rig: Rig, store: Store, settings: Settings, rate: float,
                   seconds: float, seen: set[str]) -> Step:
    step = Step(rate)
    count = max(1, int(rate * seconds))
    specs = [CallSpec(rig.accounts[i % len(rig.accounts)], NUMBER, HOLDS_MS[i % len(HOLDS_MS)])
             for i in range(count)]
    log_mark = len(rig.pbx.log_text())
    serve_mark = len(rig.log.read_text(errors="replace"))
    assert rig.pbx.proc is not None
    pid = rig.pbx.proc.pid
    pids = rig.pids()
    cpu0, (busy0, total0), t0 = cpu_seconds(pid), machine_ticks(), time.monotonic()
    each0 = process_cpu(pids)
    run = start_calls(rig.pbx, specs, rate=rate, limit=int(rate * 15) + 10,
                      max_seconds=seconds + 60)
    try:
        with Sampler(rig.pbx) as sampler:
            res: LoadResult = await asyncio.to_thread(run.wait)
    finally:
        run.kill()
    cpu1, (busy1, total1), t1 = cpu_seconds(pid), machine_ticks(), time.monotonic()
    each1 = process_cpu(pids)
    step.cpu = {k: (each1[k] - each0[k]) / max(t1 - t0, 1e-6) for k in pids}
    step.calls, step.seconds, step.peak_up = count, res.seconds, sampler.peak
    step.asterisk_cpu = (cpu1 - cpu0) / max(t1 - t0, 1e-6)
    step.machine_busy = (busy1 - busy0) / max(total1 - total0, 1)
    step.sipp = res.by_end()
    step.unanswered = sum(1 for o in res.outcomes if not o.answered)
    latencies = list(agi_latencies(rig.pbx, log_mark).values())
    step.auth_samples = len(latencies)
    step.auth_p50_ms = 1000 * percentile(latencies, 50)
    step.auth_p99_ms = 1000 * percentile(latencies, 99)
    # This step's CDRs: the ones not seen in earlier steps (Master.csv only grows); wait
    # (bounded) for the last calls' records to be written.
    t_calls = time.monotonic()
    deadline = time.monotonic() + 15
    while True:
        new = {u: c for u, c in rig.pbx.cdrs().items() if u not in seen
               and c.channel.startswith("PJSIP/") and not c.channel.startswith("PJSIP/my-")}
        if len(new) >= count - step.sipp.get("failed", 0) - step.sipp.get("rejected", 0) \
                or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)  # polling the CDR file with a deadline
    seen.update(new)
    dialed: dict[str, Cdr] = {u: c for u, c in new.items() if c.lastapp == "Dial"}
    step.dialed, step.refused = len(dialed), len(new) - len(dialed)
    t_cdrs = time.monotonic()
    step.unsettled, step.holds_left = await settle(store, settings, list(dialed),
                                                   rig.accounts, SETTLE_SECONDS)
    log.info("%g calls/s: CDRs read %.1f s after the last call, calls settled %.1f s later",
             rate, t_cdrs - t_calls, time.monotonic() - t_cdrs)
    charged, _ = await charges_of(store, rig.accounts)
    rate_row = DECK.lookup(NUMBER, settings.billing.normalisation)
    for ref, cdr in dialed.items():
        want, got = cost(rate_row, cdr.billsec), charged.get(ref, 0)
        if got != want:
            step.misbilled += 1
            step.unbilled += got == 0
            if len(step.examples) < 5:
                step.examples.append(f"{ref}: billsec {cdr.billsec} costs {want}, "
                                     f"charged {got}")
    step.decisions = rig.decisions(serve_mark)
    return step


async def _ramp(rig: Rig, settings: Settings, rates: list[float],
                seconds: float) -> list[Step]:
    store = await open_store(settings)
    try:
        await store.rates.replace(DECK)
        for account in rig.accounts:
            await store.ledger.create_account(account, currency="EUR")
            await store.ledger.credit(account, OPENING, key=f"seed:{account}",
                                      ref="bench seed")
        steps: list[Step] = []
        seen: set[str] = set()
        for rate in rates:
            step = await one_step(rig, store, settings, rate, seconds, seen)
            steps.append(step)
            log.info("%g calls/s: %s", rate, step.row())
            if step.saturated:
                log.info("Asterisk saturated at %g calls/s (%s): ramp stopped", rate,
                         step.saturated)
                break
        return steps
    finally:
        await store.close()


def table(steps: list[Step]) -> str:
    """The ramp as a Markdown table (for the README)."""
    lines = ["| calls/s | peak calls up | auth p50/p99 ms | misbilled calls | callers refused "
             "| holds left (EUR) | CPU serve / Asterisk / Redis | serve / Asterisk |",
             "|---|---|---|---|---|---|---|---|"]
    for s in steps:
        serve = sum(v for k, v in s.cpu.items() if k not in ("asterisk", "redis"))
        asterisk, redis = s.cpu.get("asterisk", 0.0), s.cpu.get("redis", 0.0)
        ratio = f"{serve / asterisk:.2f}" if asterisk else "-"
        lines.append(f"| {s.rate:g} | {s.peak_up} | {s.auth_p50_ms:.0f} / {s.auth_p99_ms:.0f} "
                     f"| {s.misbilled} of {s.dialed} | {s.refused} | {s.holds_left / 1e6:.2f} "
                     f"| {100 * serve:.0f}% / {100 * asterisk:.0f}% / {100 * redis:.0f}% "
                     f"| {ratio} |")
    return "\n".join(lines)


def run(rates: list[float] | None = None, seconds: float | None = None,
        keep: Path | None = None) -> dict[str, Any]:
    reason = pbx_unavailable_reason()
    if reason is not None:
        return {"skipped": reason}
    if rates is None:
        env = os.environ.get("PREPAID_BENCH_SIP_RATES", "")
        rates = [float(r) for r in env.split(",") if r.strip()] or list(RATES)
    if seconds is None:
        seconds = float(os.environ.get("PREPAID_BENCH_SIP_SECONDS", STEP_SECONDS))
    with tempfile.TemporaryDirectory(prefix="prepaid-bench-sip-") as tmp:
        rig = Rig(Path(tmp))
        try:
            settings = rig.start()
            steps = asyncio.run(_ramp(rig, settings, rates, seconds))
        finally:
            if keep is not None:  # the logs, for reading after the run
                keep.mkdir(parents=True, exist_ok=True)
                for src, name in ((rig.log, "serve.log"), (rig.pbx.log_path, "full.log")):
                    with contextlib.suppress(OSError):
                        shutil.copy(src, keep / name)
            rig.stop()
    figures: dict[str, Any] = {f"{s.rate:g}/s": s.row() for s in steps}
    stopped = next((f"{s.rate:g}/s: {s.saturated}" for s in steps if s.saturated), "")
    figures["saturated"] = stopped or "not within the ramp"
    figures["misbilled"] = sum(s.misbilled for s in steps)
    figures["table"] = table(steps)
    figures["steps"] = [asdict(s) for s in steps]
    return figures


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sip_ramp", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--rates", default=",".join(str(r) for r in RATES),
                    help="calls/s of each step, comma-separated (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=STEP_SECONDS,
                    help="how long each rate is offered (default %(default)s)")
    ap.add_argument("--keep", type=Path, help="copy prepaid serve's and Asterisk's logs here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    figures = run([float(r) for r in args.rates.split(",")], args.seconds, args.keep)
    print(figures.get("table", ""))
    print(json.dumps({k: v for k, v in figures.items() if k != "table"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
