"""Authorization latency under an AMI event flood: ``prepaid serve``'s processes against the
old single event loop.

A local redis-server, an AMI peer that floods the listener with recorded Asterisk 22
traffic (fresh Uniqueids every round, as fast as the socket takes it), and FastAGI calls
offered at a fixed rate, each timed from connect to the end of the session. Three runs:
processes without a flood, processes with it (``prepaid serve --only agi --only ami``), and
both services on one loop in one process (``shell.serve.run_services``, as serve was).
``python -m bench.isolation``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from prepaid.health import beat
from prepaid.ledger import Ledger
from prepaid.ratedeck import parse_csv
from prepaid.ratestore import RateStore
from prepaid.redis_client import connect
from testbed.agi_peer import AgiPeer, agi_env
from testbed.ami_peer import FIXTURES, AmiPeer
from testbed.servers import RedisServer, free_port

SHARED = FIXTURES / "shared"
DECK = "prefix,name,price_per_minute,connect_fee,initial_increment,increment\n49,DE,0.06,0,1,1\n"
RATE = 40  # authorizations offered per second
FLOOD = float(os.environ.get("FLOOD_ROUNDS", "30"))  # rounds of the recordings a second
SECONDS = 10
PREPAID = str(Path(sys.executable).parent / "prepaid")
ONE_LOOP = """
import asyncio, signal, sys
from prepaid import config
from shell import serve
settings = config.load(__import__("pathlib").Path(sys.argv[1]))
serve.configure_logging("WARNING")
async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await serve.run_services(settings, ["agi", "ami"], stop)
asyncio.run(main())
"""
_STAMP = re.compile(rb"^Timestamp: (\d+)\.", re.M)


def _recordings() -> list[tuple[bytes, list[bytes]]]:
    out = []
    for path in sorted(SHARED.glob("*.ami")):
        raw = path.read_bytes()
        uids = sorted(set(re.findall(rb"^Uniqueid: (\S+)\r$", raw, re.M)), key=len,
                      reverse=True)
        out.append((raw, uids))
    return out


def _later(seconds: int, stamp: re.Match[bytes]) -> bytes:
    """A recorded ``Timestamp:`` moved ``seconds`` on."""
    return b"Timestamp: %d." % (int(stamp.group(1)) + seconds)


async def _flood(peer: AmiPeer, rounds_per_second: float) -> None:
    """Recorded traffic, renamed each round, at a fixed rate (each round is every
    recording once: one call of each kind), forever."""
    recordings = _recordings()
    began = time.perf_counter()
    n = 0
    while True:
        writer = peer._writer  # the logged-in listener's connection
        if writer is None or writer.is_closing():
            await asyncio.sleep(0.05)
            continue
        n += 1
        for raw, uids in recordings:
            for uid in uids:
                raw = raw.replace(uid + b"\r\n", uid + b"%06d\r\n" % n)
            raw = _STAMP.sub(partial(_later, 60 * n), raw)
            writer.write(raw)
        with contextlib.suppress(ConnectionError, OSError):
            await writer.drain()
        await asyncio.sleep(max(0.0, began + n / rounds_per_second - time.perf_counter()))


async def _flood_main(rounds_per_second: float) -> None:
    """The AMI peer in a process of its own, so the flood does not slow the callers."""
    peer = AmiPeer()
    print(await peer.start(), flush=True)
    await _flood(peer, rounds_per_second)


async def _one(port: int, run: str, n: int) -> float | None:
    ref = f"iso{run}.{n}"
    peer = AgiPeer(agi_env(ref, "00491701234567", callerid=f"a{n % 50}", port=port),
                   variables={"CHANNEL(linkedid)": ref})
    began = time.perf_counter()
    try:
        await peer.call(port, within=10)
    except (OSError, TimeoutError):
        return None
    if peer.set_vars.get("PREPAID_STATUS") != "ALLOWED":
        return None
    return time.perf_counter() - began


async def _offer(port: int) -> dict[str, float]:
    tasks = []
    began = time.perf_counter()
    run = f"{os.getpid()}{int(began * 1000)}"
    for n in range(RATE * SECONDS):
        tasks.append(asyncio.create_task(_one(port, run, n)))
        await asyncio.sleep(max(0.0, began + (n + 1) / RATE - time.perf_counter()))
    got = await asyncio.gather(*tasks)
    ok = sorted(x for x in got if x is not None)
    q = statistics.quantiles(ok, n=100) if len(ok) > 1 else [0.0] * 99
    return {"p50_ms": round(q[49] * 1000, 1), "p99_ms": round(q[98] * 1000, 1),
            "failed": len(got) - len(ok), "calls": len(got)}


def _spawn(args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True, **kw)


async def _run(url: str, mode: str, flood: float) -> dict[str, Any]:
    """``flood``: rounds of recordings a second (0: the AMI peer sends nothing)."""
    flooder = _spawn([sys.executable, "-m", "bench.isolation", "flood", str(flood)],
                     stdout=subprocess.PIPE)
    assert flooder.stdout is not None
    ami_port = int(flooder.stdout.readline())
    agi_port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "prepaid.toml"
        conf.write_text(f'[redis]\nurl = "{url}"\n[agi]\nlisten = "127.0.0.1:{agi_port}"\n'
                        'allow_unmetered = true\ntimeout = 10.0\n'
                        f'[ami]\nport = {ami_port}\nsecret = "s3cret"\n')
        conf.chmod(0o600)
        args = ([sys.executable, "-c", ONE_LOOP, str(conf)] if mode == "one loop" else
                [PREPAID, "--config", str(conf), "serve", "--log-level", "WARNING",
                 "--only", "agi", "--only", "ami"])
        proc = _spawn(args)
        try:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(OSError):
                    _, w = await asyncio.open_connection("127.0.0.1", agi_port)
                    w.close()
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("FastAGI never listened")
                await asyncio.sleep(0.1)
            await asyncio.sleep(2.0)  # logged in, the flood under way
            figures: dict[str, Any] = await _offer(agi_port)
        finally:
            for p in (proc, flooder):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
    calls = flood * len(_recordings())
    return {"mode": mode, "ami_calls_per_s": calls, **figures}


async def _main() -> list[dict[str, Any]]:
    server = RedisServer()
    server.start()
    client = connect(server.url)
    try:
        ledger = Ledger(client)
        await RateStore(client).replace(parse_csv(DECK))
        for i in range(50):
            await ledger.create_account(f"a{i}", currency="EUR")
            await ledger.credit(f"a{i}", 10**12, key="seed")
        await beat(client, "prepaid", "", state="up", backlog=0, ttl=3600)
        return [await _run(server.url, mode, flood)
                for mode, flood in (("processes", 0), ("processes", FLOOD),
                                    ("one loop", FLOOD))]
    finally:
        await client.aclose()
        server.cleanup()


def run() -> dict[str, Any]:
    return {f"{r['mode']}, AMI {r['ami_calls_per_s']:g} calls/s": r
            for r in asyncio.run(_main())}


if __name__ == "__main__":
    if sys.argv[1:2] == ["flood"]:
        asyncio.run(_flood_main(float(sys.argv[2])))
    else:
        print(json.dumps(run(), indent=2))
