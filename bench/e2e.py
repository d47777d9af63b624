"""End to end through a real Asterisk 22: the project's CPU next to Asterisk's, and what
authorization adds to call set-up.

- ``CONCURRENT`` metered calls at once (AMI Originate of ``Local/<number>@prepaid-outbound``;
  the test-bed trunk answers and hangs up after ``CALL_SECONDS``), with ``prepaid serve`` as a
  subprocess. CPU seconds (utime + stime from /proc/<pid>/stat) of the serve process, of
  Asterisk and of redis-server over that phase.
- Call set-up time with and without authorization, interleaved in the same run: the time
  from the caller channel's creation to its ``DialBegin`` (Asterisk's event timestamps), for
  ``prepaid-outbound`` (AGI authorize, then Dial) and for ``testbed-dial`` (the same Dial, no
  AGI).

Run with ``python -m bench e2e``; needs root (Asterisk runs chrooted), else it is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import percentile
from prepaid import keys
from prepaid.ledger import Ledger
from prepaid.redis_client import connect
from testbed.ami import Ami, Message
from testbed.pbx import Pbx, free_port, pbx_unavailable_reason, project_ami_user
from testbed.servers import RedisServer

CONCURRENT = 20
CALL_SECONDS = 5
SETUP_SAMPLES = 20  # per kind, one call at a time
BURST = 10  # then this many calls at once, per kind
RATES = """\
prefix,name,price_per_minute,connect_fee,initial_increment,increment
88,Bench trunk,6.00,0.05,1,1
"""


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Rig:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.redis = RedisServer()
        self.agi_port = free_port(socket.SOCK_STREAM)
        self.pbx = Pbx(agi_port=self.agi_port)
        self.serve: subprocess.Popen[bytes] | None = None
        self.ami: Ami | None = None
        self.env = dict(os.environ)

    def start(self) -> None:
        self.redis.start()
        self.pbx.start()
        user, secret = project_ami_user()
        (self.work / "rates.csv").write_text(RATES)
        config = self.work / "prepaid.toml"
        config.write_text(
            f'[redis]\nurl = "{self.redis.url}"\n[billing]\ncurrency = "EUR"\n'
            'rates = "rates.csv"\nnational_prefix = ""\n'
            f'[ami]\nport = {self.pbx.ami_port}\nusername = "{user}"\n'
            f'[agi]\nlisten = "127.0.0.1:{self.agi_port}"\n'
            f'[smtp]\nport = {free_port()}\n')
        config.chmod(0o640)
        self.env["PREPAID_AMI_SECRET"] = secret
        prepaid = str(Path(sys.executable).parent / "prepaid")
        for args in (["rates", "import"], ["account", "create", "bench"],
                     ["topup", "bench", "1000", "--override"]):
            subprocess.run([prepaid, "--config", str(config), *args], check=True,
                           capture_output=True, env=self.env, timeout=30)
        log = self.work / "serve.log"
        with log.open("wb") as out:
            self.serve = subprocess.Popen(
                [prepaid, "--config", str(config), "serve", "--log-level", "WARNING"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                start_new_session=True)
        # Ready when the AGI port accepts and the metering user has logged in to Asterisk.
        self.pbx.wait_for_log(r"Manager '" + user + "' logged on", timeout=20)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.agi_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.serve.poll() is not None:
                    raise RuntimeError("prepaid serve did not come up:\n"
                                       + log.read_text(errors="replace")[-2000:]) from None
                time.sleep(0.05)  # polling a port with a deadline

    def stop(self) -> None:
        if self.serve is not None and self.serve.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.serve.pid, signal.SIGTERM)
            try:
                self.serve.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.serve.pid, signal.SIGKILL)
                self.serve.wait(5)
        self.pbx.stop()
        self.redis.cleanup()

    def pids(self) -> dict[str, int]:
        assert self.serve is not None and self.pbx.proc is not None
        assert self.redis.proc is not None
        return {"serve": self.serve.pid, "asterisk": self.pbx.proc.pid,
                "redis": self.redis.proc.pid}


async def originate(ami: Ami, channel: str, ref: str) -> None:
    resp = await ami.action("Originate", Channel=channel, Application="Wait", Data="60",
                            CallerID='"bench" <bench>', Async="true", Timeout="30000",
                            ChannelId=f"orig-{ref}", OtherChannelId=ref)
    if resp.get("Response") != "Success":
        raise RuntimeError(f"Originate {channel} refused: {resp}")


def find(ami: Ami, ref: str, name: str, **fields: str) -> Message | None:
    for m in ami.seen:
        if (m.get("Event") == name and m.get("Uniqueid") == ref
                and all(m.get(k) == v for k, v in fields.items())):
            return m
    return None


async def wait_all(ami: Ami, refs: list[str], name: str, within: float,
                   **fields: str) -> list[Message]:
    deadline = time.monotonic() + within
    while True:
        found = [find(ami, r, name, **fields) for r in refs]
        if all(found):
            return [m for m in found if m is not None]
        if time.monotonic() > deadline:
            missing = sum(1 for m in found if m is None)
            raise RuntimeError(f"{missing} of {len(refs)} calls without {name} after {within}s")
        await asyncio.sleep(0.05)  # polling the event list with a deadline


async def concurrent_calls(rig: Rig, ami: Ami) -> dict[str, Any]:
    client = connect(rig.redis.url)
    ledger = Ledger(client)
    before_balance = (await ledger.get("bench")).balance
    pids = rig.pids()
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    wall0 = time.monotonic()
    refs = [f"cc{secrets.token_hex(5)}" for _ in range(CONCURRENT)]
    number = f"0088{CALL_SECONDS:02d}123456"
    for ref in refs:
        await originate(ami, f"Local/{number}@prepaid-outbound", ref)
    answers = await wait_all(ami, refs, "DialEnd", 30, DialStatus="ANSWER")
    hangups = await wait_all(ami, refs, "Hangup", CALL_SECONDS + 30)
    deadline = time.monotonic() + 20
    while True:  # metering settles each call: its record's state becomes 'ended'
        states = [await client.hget(keys.call_record("prepaid", r), "state") for r in refs]
        if all(s == b"ended" for s in states) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    wall = time.monotonic() - wall0
    cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
    after = await ledger.get("bench")
    await client.aclose()
    talk = [float(h["Timestamp"]) - float(a["Timestamp"]) for a, h in zip(answers, hangups,
                                                                          strict=True)]
    return {
        "concurrent_calls": CONCURRENT,
        "calls_settled": sum(1 for s in states if s == b"ended"),
        "call_seconds_mean": round(sum(talk) / len(talk), 3),
        "phase_wall_s": round(wall, 2),
        "serve_cpu_s": round(cpu["serve"], 3),
        "asterisk_cpu_s": round(cpu["asterisk"], 3),
        "redis_cpu_s": round(cpu["redis"], 3),
        "serve_cpu_pct_of_asterisk": round(100 * cpu["serve"] / cpu["asterisk"], 1)
        if cpu["asterisk"] else None,
        "charged_eur": (before_balance - after.balance) / 1_000_000,
        "held_after": after.held,
    }


async def setup_times(ami: Ami, samples_each: int, batch: int, label: str) -> dict[str, Any]:
    """Creation of the dialplan channel to its DialBegin, with and without the AGI, in
    batches of ``batch`` calls placed at once."""
    samples: dict[str, list[float]] = {"with_agi": [], "without_agi": []}
    contexts = {"with_agi": "prepaid-outbound", "without_agi": "testbed-dial"}
    number = "00880012345"  # the trunk answers and hangs up at once
    for _ in range(samples_each // batch):
        for kind, context in contexts.items():  # interleaved: same load, same moment
            refs = [f"su{secrets.token_hex(5)}" for _ in range(batch)]
            for ref in refs:
                await originate(ami, f"Local/{number}@{context}", ref)
            begins = await wait_all(ami, refs, "DialBegin", 20)
            await wait_all(ami, refs, "Hangup", 20)
            for ref, begin in zip(refs, begins, strict=True):
                new = find(ami, ref, "Newchannel")
                assert new is not None
                samples[kind].append(float(begin["Timestamp"]) - float(new["Timestamp"]))
    out: dict[str, Any] = {f"{label}_samples_each": samples_each}
    for kind, values in samples.items():
        out[f"{label}_{kind}_p50_ms"] = round(percentile(values, 50) * 1000, 2)
        out[f"{label}_{kind}_p99_ms"] = round(percentile(values, 99) * 1000, 2)
    out[f"{label}_authorization_adds_p50_ms"] = round(
        out[f"{label}_with_agi_p50_ms"] - out[f"{label}_without_agi_p50_ms"], 2)
    return out


async def _run(rig: Rig) -> dict[str, Any]:
    ami = await Ami.connect(rig.pbx.ami_port, rig.pbx.ami_username, rig.pbx.ami_secret)
    try:
        figures = await concurrent_calls(rig, ami)
        figures.update(await setup_times(ami, SETUP_SAMPLES, 1, "setup"))
        figures.update(await setup_times(ami, BURST, BURST, f"setup_burst{BURST}"))
        return figures
    finally:
        await ami.close()


def run() -> dict[str, Any]:
    reason = pbx_unavailable_reason()
    if reason is not None:
        return {"skipped": reason}
    with tempfile.TemporaryDirectory(prefix="prepaid-bench-e2e-") as tmp:
        rig = Rig(Path(tmp))
        try:
            rig.start()
            return asyncio.run(_run(rig))
        finally:
            rig.stop()


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
