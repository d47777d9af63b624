"""Real SIP calls through the test bed's Asterisk (``Pbx(trunk="sip")``), placed by SIPp.

- :class:`FarEnd`: a SIPp UAS on ``127.0.0.1:pbx.farend_port`` (testbed/sipp/uas_farend.xml),
  where the shipped ``Dial(PJSIP/<number>@my-trunk)`` lands. It answers with 200 + SDP,
  echoes the RTP it gets (``-rtp_echo``) and answers the BYE; it counts the INVITEs it saw.
- :func:`start_calls` / :func:`run_calls`: a SIPp UAC (testbed/sipp/uac_load.xml) placing one
  call per :class:`CallSpec` at ``rate`` calls a second, each from its account's endpoint
  (From user = account) to a number, streaming RTP once answered; the caller hangs up
  after ``hold_ms`` or, with ``hold_ms = 0``, waits for Asterisk's BYE. The result has one
  :class:`Outcome` per call, read from SIPp's ``-trace_logs`` file.
- :func:`agi_latencies`: how long each authorization took as Asterisk saw it (from the
  AGI() step to the next dialplan step, in Asterisk's `full` log).

Every SIPp run is bounded in time (``-timeout`` and a wall-clock bound around it) and killed
on teardown (``close()``, or the module's atexit hook). Everything is on 127.0.0.1.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import math
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from testbed.pbx import Pbx, PbxError, free_port

log = logging.getLogger(__name__)

SIPP = "/usr/bin/sipp"
SCENARIOS = Path(__file__).resolve().parent / "sipp"
UAS_SCENARIO = SCENARIOS / "uas_farend.xml"
UAC_SCENARIO = SCENARIOS / "uac_load.xml"
VOICE_NAME = "prepaid-voice.ulaw"  # uac_load.xml streams this file (relative to SIPp's cwd)
DEFAULT_WAIT_MS = 600_000  # uac_load.xml as committed: how long hold_ms = 0 calls wait
# SIPp's own RTP ports, clear of Asterisk's (testbed/pbx_conf/rtp.conf: 10000-20000) and of
# Linux's ephemeral ports (32768-60999, where free_port() finds SIP and echo ports); each UAC
# run takes the next block (2000 calls' RTP and RTCP), so runs side by side never compete.
RTP_BASE = 20_400
RTP_BLOCK = 4_000
RTP_BLOCKS = 3
_rtp_blocks = itertools.count()

END_LINE = re.compile(
    r"END (?P<how>caller|remote|glare|rejected) (?P<n>\d+) (?P<tag>\S+) (?P<account>\S+) "
    r"(?P<number>\S+) (?P<call_id>\S+)(?: (?P<extra>\S+))?")
ANSWERED_LINE = re.compile(r"ANSWERED (?P<n>\d+) (?P<tag>\S+) ")
INVITE_LINE = re.compile(r"INVITE (?P<call_id>\S+) (?P<number>\S*)")
STEP = re.compile(
    r"^\[(?P<ts>[0-9-]+ [0-9:.]+)\] VERBOSE\[[^]]*\]\S* pbx\.c: Executing "
    r"\[[^@\]]*@prepaid-outbound:(?P<prio>\d+)\] (?P<app>\w+)\(\"(?P<chan>[^\"]+)\"", re.M)


class SippError(RuntimeError):
    """SIPp could not be started or did not finish in time."""


_live: weakref.WeakSet[_Sipp] = weakref.WeakSet()


@atexit.register
def _kill_all() -> None:
    for proc in list(_live):
        with contextlib.suppress(Exception):
            proc.kill()


def ulaw_tone(seconds: float = 1.0, hz: float = 425.0, level: float = 0.25) -> bytes:
    """A sine tone as raw G.711 mu-law at 8 kHz: the callers' voice (rtp_stream plays it)."""
    out = bytearray()
    for i in range(int(8000 * seconds)):
        sample = int(level * 32767 * math.sin(2 * math.pi * hz * i / 8000))
        out.append(_ulaw(sample))
    return bytes(out)


def _ulaw(sample: int) -> int:
    """G.711 mu-law encoding of one 16-bit linear sample."""
    bias, clip = 0x84, 32635
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), clip) + bias
    exponent = max(0, magnitude.bit_length() - 8)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


class _Sipp:
    """One SIPp process chrooted into the PBX root (its own session, killed as a group)."""

    def __init__(self, pbx: Pbx, name: str, argv: list[str]) -> None:
        self.pbx = pbx
        self.name = name
        self.stdout_path = pbx.run_dir / f"{name}.stdout"
        with self.stdout_path.open("wb") as out:
            self.proc = subprocess.Popen(
                pbx.chroot_command([SIPP, *argv]), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, cwd=pbx.run_dir, start_new_session=True,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                     "HOME": "/root"})
        _live.add(self)

    def inner(self, path: Path) -> str:
        """`path` (under the run directory) as SIPp sees it inside the chroot."""
        return f"{self.pbx.run_dir_inner}/{path.relative_to(self.pbx.run_dir)}"

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise SippError(f"{self.name}: SIPp still running after {timeout:.0f} s; killed\n"
                            + self.output()) from None

    def kill(self) -> None:
        """SIGTERM, then SIGKILL, to SIPp's whole process group (it is its own session)."""
        _live.discard(self)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)

    def output(self, chars: int = 3000) -> str:
        try:
            text = self.stdout_path.read_text(errors="replace")
        except OSError:
            return ""
        return f"--- {self.stdout_path} ---\n" + text[-chars:]


# --------------------------------------------------------------------------- far end


class FarEnd:
    """The SIPp UAS behind my-trunk. ``with FarEnd(pbx) as far: ...``; ``far.invites()``."""

    def __init__(self, pbx: Pbx, *, max_seconds: float = 3600) -> None:
        if pbx.trunk != "sip" or not pbx.farend_port:
            raise PbxError("FarEnd needs a started Pbx(trunk='sip')")
        self.pbx = pbx
        self.max_seconds = max_seconds
        tag = secrets.token_hex(3)
        self.log_path = pbx.run_dir / f"farend-{tag}.log"
        self.err_path = pbx.run_dir / f"farend-{tag}.errors"
        self.media_port = _free_udp_pair()
        self._sipp: _Sipp | None = None
        self._tag = tag

    def start(self) -> FarEnd:
        scenario = self.pbx.run_dir / UAS_SCENARIO.name
        scenario.write_text(UAS_SCENARIO.read_text())
        self.log_path.write_text("")
        run = self.pbx.run_dir_inner
        argv = ["-sf", f"{run}/{scenario.name}", "-i", "127.0.0.1", "-p",
                str(self.pbx.farend_port), "-mi", "127.0.0.1", "-mp", str(self.media_port),
                "-rtp_echo", "-nostdin", "-trace_logs", "-log_file",
                f"{run}/{self.log_path.name}", "-trace_err", "-error_file",
                f"{run}/{self.err_path.name}", "-timeout", f"{self.max_seconds:.0f}s",
                "-max_recv_loops", "5000", "-max_sched_loops", "5000", "-f", "10"]
        self._sipp = _Sipp(self.pbx, f"farend-{self._tag}", argv)
        self._wait_listening()
        return self

    def _wait_listening(self, within: float = 10.0) -> None:
        """Back once SIPp holds its UDP port (it binds before it reads the scenario's
        first message); bounded."""
        assert self._sipp is not None
        deadline = time.monotonic() + within
        while True:
            if not self._sipp.running():
                raise SippError("far-end SIPp exited at start\n" + self._sipp.output())
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    s.bind(("127.0.0.1", self.pbx.farend_port))
                except OSError:
                    return  # taken: SIPp is listening
            if time.monotonic() > deadline:
                raise SippError(f"far-end SIPp not on UDP {self.pbx.farend_port} after "
                                f"{within} s\n" + self._sipp.output())
            time.sleep(0.02)  # polling for the bind, with a deadline

    def invites(self) -> list[tuple[str, str]]:
        """(Call-ID, dialed number) of each INVITE the far end has seen so far."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [(m["call_id"], m["number"]) for m in INVITE_LINE.finditer(text)]

    def byes(self) -> int:
        """BYEs the far end has answered so far (one per call that ended)."""
        return len(re.findall(r"^BYE ", _read(self.log_path), re.M))

    def errors(self) -> str:
        try:
            return self.err_path.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        if self._sipp is not None:
            self._sipp.kill()

    def __enter__(self) -> FarEnd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _free_udp_pair() -> int:
    """An even UDP port p with p and p + 2 free (SIPp's -rtp_echo binds both)."""
    for _ in range(100):
        port = free_port(socket.SOCK_DGRAM)
        port -= port % 2
        if 1024 < port < 65000 and all(_udp_free(p) for p in (port, port + 1, port + 2)):
            return port
    raise SippError("no free UDP port pair for the far end's RTP echo")


def _udp_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------- callers


@dataclass(frozen=True)
class CallSpec:
    """One call: from ``account`` (its endpoint) to ``number``; the caller hangs up after
    ``hold_ms`` of answered time, or with 0 waits for Asterisk to hang up. ``tag`` (the From
    display name, so Master.csv's clid) names the call; empty: ``c<run>-<n>``."""

    account: str
    number: str
    hold_ms: int = 0
    tag: str = ""


@dataclass(frozen=True)
class Outcome:
    tag: str
    account: str
    number: str
    answered: bool
    end: str  # caller | remote | glare | rejected | failed (SIPp gave up on the call)
    call_id: str = ""
    detail: str = ""  # the error code of a rejected call, why the caller hung up


@dataclass
class LoadResult:
    outcomes: list[Outcome]
    returncode: int
    seconds: float
    errors: str = ""
    stats: dict[str, str] = field(default_factory=dict)

    def by_end(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for o in self.outcomes:
            counts[o.end] = counts.get(o.end, 0) + 1
        return counts

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.end == "failed"]


class UacRun:
    """A SIPp UAC placing ``calls`` in the background; ``wait()`` gives the result."""

    def __init__(self, pbx: Pbx, calls: Sequence[CallSpec], *, rate: float,
                 limit: int | None = None, wait_ms: int = 120_000,
                 max_seconds: float | None = None) -> None:
        if not calls:
            raise ValueError("no calls")
        if pbx.trunk != "sip":
            raise PbxError("callers need Pbx(trunk='sip', sip_accounts=[...])")
        unknown = sorted({c.account for c in calls} - set(pbx.sip_accounts))
        if unknown:
            raise PbxError(f"accounts without an endpoint (Pbx(sip_accounts=...)): {unknown}")
        self.pbx = pbx
        self.run_tag = secrets.token_hex(3)
        self.calls = [c if c.tag else CallSpec(c.account, c.number, c.hold_ms,
                                               f"c{self.run_tag}-{i}")
                      for i, c in enumerate(calls, 1)]
        tags = [c.tag for c in self.calls]
        if len(set(tags)) != len(tags) or any(not re.fullmatch(r"[\w.+-]+", t) for t in tags):
            raise ValueError("call tags must be unique words")
        self.rate = rate
        span = len(self.calls) / rate + max(c.hold_ms for c in self.calls) / 1000
        if any(c.hold_ms == 0 for c in self.calls):
            span += wait_ms / 1000
        self.max_seconds = max_seconds if max_seconds is not None else span + 30
        base = f"uac-{self.run_tag}"
        d = pbx.run_dir
        self.log_path, self.err_path = d / f"{base}.log", d / f"{base}.errors"
        self.stat_path, csv_path, scenario = d / f"{base}.stat.csv", d / f"{base}.csv", \
            d / f"{base}.xml"
        (d / VOICE_NAME).write_bytes(ulaw_tone())
        csv_path.write_text("SEQUENTIAL\n" + "".join(
            f"{c.account};{c.number};{c.hold_ms};{c.tag}\n" for c in self.calls))
        scenario.write_text(uac_scenario({c.hold_ms for c in self.calls}, wait_ms))
        self.log_path.write_text("")
        block = next(_rtp_blocks) % RTP_BLOCKS
        run = pbx.run_dir_inner
        argv = [f"127.0.0.1:{pbx.sip_port}", "-sf", f"{run}/{scenario.name}",
                "-inf", f"{run}/{csv_path.name}", "-m", str(len(self.calls)),
                "-r", f"{rate:g}", "-rp", "1000",
                "-l", str(limit if limit is not None else len(self.calls)),
                "-i", "127.0.0.1", "-p", str(free_port(socket.SOCK_DGRAM)),
                "-mi", "127.0.0.1",
                "-min_rtp_port", str(RTP_BASE + block * RTP_BLOCK),
                "-max_rtp_port", str(RTP_BASE + (block + 1) * RTP_BLOCK - 1),
                "-nostdin", "-trace_logs", "-log_file", f"{run}/{self.log_path.name}",
                "-trace_err", "-error_file", f"{run}/{self.err_path.name}",
                "-trace_stat", "-stf", f"{run}/{self.stat_path.name}", "-fd", "1",
                "-max_recv_loops", "5000", "-max_sched_loops", "5000", "-f", "10",
                "-timeout", f"{self.max_seconds:.0f}s"]
        self.started = time.monotonic()
        self._sipp = _Sipp(pbx, base, argv)
        self._result: LoadResult | None = None
        self._lock = threading.Lock()

    def running(self) -> bool:
        return self._sipp.running()

    def outcomes(self) -> list[Outcome]:
        """Per-call outcomes so far (calls not ended yet are left out)."""
        return parse_outcomes(self.log_path, [])

    def answered_tags(self) -> set[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return set()
        return {m["tag"] for m in ANSWERED_LINE.finditer(text)}

    def wait(self) -> LoadResult:
        """Wait (bounded by the run's time limit) for SIPp to finish; the result."""
        with self._lock:
            if self._result is None:
                remaining = self.max_seconds + 15 - (time.monotonic() - self.started)
                rc = self._sipp.wait(max(remaining, 1))
                self._result = LoadResult(
                    parse_outcomes(self.log_path, self.calls), rc,
                    time.monotonic() - self.started, _read(self.err_path),
                    last_stats(self.stat_path))
                log.info("SIPp %s: %d calls in %.1f s, exit %d: %s", self.run_tag,
                         len(self.calls), self._result.seconds, rc, self._result.by_end())
            return self._result

    def kill(self) -> None:
        self._sipp.kill()

    def output(self) -> str:
        return self._sipp.output() + "\n--- errors ---\n" + _read(self.err_path)[-3000:]


def start_calls(pbx: Pbx, calls: Sequence[CallSpec], *, rate: float,
                limit: int | None = None, wait_ms: int = 120_000,
                max_seconds: float | None = None) -> UacRun:
    """Start placing ``calls`` at ``rate`` calls/s in the background (see :class:`UacRun`)."""
    return UacRun(pbx, calls, rate=rate, limit=limit, wait_ms=wait_ms,
                  max_seconds=max_seconds)


def run_calls(pbx: Pbx, calls: Sequence[CallSpec], *, rate: float,
              limit: int | None = None, wait_ms: int = 120_000,
              max_seconds: float | None = None) -> LoadResult:
    """Place ``calls`` and wait for all of them to end."""
    run = start_calls(pbx, calls, rate=rate, limit=limit, wait_ms=wait_ms,
                      max_seconds=max_seconds)
    try:
        return run.wait()
    finally:
        run.kill()


def uac_scenario(holds: Iterable[int], wait_ms: int = DEFAULT_WAIT_MS) -> str:
    """testbed/sipp/uac_load.xml with one hold branch per distinct ``hold_ms`` (a receive's
    time-out is fixed in the scenario file, so each duration needs its own receive)."""
    text = UAC_SCENARIO.read_text()
    branches, waits = [], []
    for ms in sorted({h for h in holds if h > 0}):
        branches.append(
            f'  <nop><action><strcmp assign_to="cmp{ms}" variable="hold" value="{ms}"/>'
            f'<test assign_to="is{ms}" variable="cmp{ms}" compare="equal" value="0"/>'
            f'</action></nop>\n  <nop next="hold{ms}" test="is{ms}"/>')
        waits.append(
            f'  <label id="hold{ms}"/>\n'
            f'  <recv request="BYE" timeout="{ms}" ontimeout="caller_bye" next="remote_bye"/>')
    text = text.replace("  <!-- HOLD_BRANCHES -->", "\n".join(branches))
    text = text.replace("  <!-- HOLD_WAITS -->", "\n".join(waits))
    text = text.replace(f'timeout="{DEFAULT_WAIT_MS}" ontimeout="wait_over"',
                        f'timeout="{wait_ms}" ontimeout="wait_over"')
    return text


def parse_outcomes(path: Path, calls: Sequence[CallSpec]) -> list[Outcome]:
    """Outcomes from a UAC's -trace_logs file; each of ``calls`` with no END line is
    ``failed`` (SIPp aborted it: a time-out, an unexpected message)."""
    text = _read(path)
    answered = {m["tag"] for m in ANSWERED_LINE.finditer(text)}
    seen: dict[str, Outcome] = {}
    for m in END_LINE.finditer(text):
        seen[m["tag"]] = Outcome(m["tag"], m["account"], m["number"], m["tag"] in answered,
                                 m["how"], m["call_id"], m["extra"] or "")
    out = list(seen.values())
    for c in calls:
        if c.tag not in seen:
            out.append(Outcome(c.tag, c.account, c.number, c.tag in answered, "failed"))
    return out


def last_stats(path: Path) -> dict[str, str]:
    """The last row of SIPp's -trace_stat file (';'-separated), by column name."""
    lines = [ln for ln in _read(path).splitlines() if ln.strip()]
    if len(lines) < 2:
        return {}
    head, last = lines[0].split(";"), lines[-1].split(";")
    return dict(zip(head, last, strict=False))


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------- Asterisk side


def agi_latencies(pbx: Pbx, start: int = 0) -> dict[str, float]:
    """Seconds each allowed call spent in AGI(authorize), by caller channel, as Asterisk's
    `full` log shows it: from the AGI() step of [prepaid-outbound] to the next step
    (a refused call is hung up inside the AGI and has no next step). ``start`` is an
    offset in the log (``len(pbx.log_text())`` before the run)."""
    began: dict[str, datetime] = {}
    out: dict[str, float] = {}
    for m in STEP.finditer(pbx.log_text(), start):
        when = datetime.strptime(m["ts"], "%Y-%m-%d %H:%M:%S.%f")
        if m["app"] == "AGI":
            began[m["chan"]] = when
        elif m["chan"] in began and m["chan"] not in out:
            out[m["chan"]] = (when - began[m["chan"]]).total_seconds()
    return out


def channels_up(pbx: Pbx) -> int:
    """Active calls now, by Asterisk (`core show channels count`)."""
    m = re.search(r"(\d+) active calls?", pbx.cli("core show channels count", timeout=10))
    return int(m.group(1)) if m else 0
