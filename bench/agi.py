"""Authorizations per second and latency: FastAGI route vs process AGI (one process per call).

Against a private redis-server. The FastAGI server and the simulated Asterisk peers share one
event loop (one core), so the figures are a floor for the server alone. Run with
``python -m bench agi`` or ``python -m bench.agi``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agi.server import AgiServer
from bench.common import percentile
from prepaid import config
from prepaid.health import Heartbeat
from prepaid.ratedeck import parse_csv
from prepaid.store import Store, open_store
from testbed.agi_peer import AgiPeer, agi_env
from testbed.servers import RedisServer

DECK = "prefix,name,price_per_minute,connect_fee,initial_increment,increment\n" \
       "49,Germany,0.06,0.10,60,60\n"
ACCOUNTS = 100
SATURATION_CALLS = 3000
CONCURRENCY = 50
OFFERED_RATE = 200  # calls per second
OFFERED_SECONDS = 5
PROCESS_CALLS = 30
PROCESS_CONCURRENCY = 4
AGI_BIN = Path(sys.executable).parent / "prepaid-agi"


def _figures(latencies: list[float], calls: int, elapsed: float, failed: int) -> dict[str, float]:
    return {"calls_per_s": round(calls / elapsed, 1),
            "p50_ms": round(percentile(latencies, 50) * 1000, 2),
            "p99_ms": round(percentile(latencies, 99) * 1000, 2), "failed": failed}


async def _one(port: int, n: int, prefix: str) -> tuple[float, bool]:
    peer = AgiPeer(agi_env(f"{prefix}{n}", "00491701234567", callerid=f"b{n % ACCOUNTS}"))
    began = time.perf_counter()
    await peer.call(port)
    return time.perf_counter() - began, peer.set_vars.get("PREPAID_STATUS") == "ALLOWED"


async def _saturation(port: int, prefix: str = "sat") -> dict[str, float]:
    latencies: list[float] = []
    failed = 0
    counter = iter(range(SATURATION_CALLS))

    async def worker() -> None:
        nonlocal failed
        for n in counter:
            took, ok = await _one(port, n, prefix)
            latencies.append(took)
            failed += not ok

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return _figures(latencies, SATURATION_CALLS, time.perf_counter() - began, failed)


def _load_process(port: int, out: Any) -> None:
    out.put(asyncio.run(_saturation(port, "apart")))


async def _saturation_apart(port: int) -> dict[str, float]:
    """The same saturation run with the peers in a process of their own, and the server's
    CPU seconds over it: authorizations per second of one core busy serving them."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_load_process, args=(port, out), daemon=True)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    proc.start()
    figures: dict[str, float] = await asyncio.to_thread(out.get, True, 300)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await asyncio.to_thread(proc.join, 30)
    figures["server_cpu_share"] = round(cpu / wall, 3)
    figures["per_server_core_s"] = round(SATURATION_CALLS / cpu, 1)
    return figures


async def _offered(port: int) -> dict[str, float]:
    """Open loop: a new call every 1/OFFERED_RATE s whatever the previous ones do."""
    total = OFFERED_RATE * OFFERED_SECONDS
    tasks: list[asyncio.Task[tuple[float, bool]]] = []
    began = time.perf_counter()
    for n in range(total):
        delay = began + n / OFFERED_RATE - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the offered load, not waiting for a result
        tasks.append(asyncio.create_task(_one(port, n, "off")))
    results = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - began
    return _figures([r[0] for r in results], total, elapsed, sum(not r[1] for r in results))


async def _process_call(conf: Path, n: int) -> tuple[float, bool]:
    peer = AgiPeer(agi_env(f"proc{n}", "00491701234567", callerid=f"b{n % ACCOUNTS}"))
    began = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        str(AGI_BIN), "authorize", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PREPAID_CONFIG": str(conf), "PREPAID_LOG_LEVEL": "ERROR"})
    assert proc.stdin is not None and proc.stdout is not None
    await peer.run(proc.stdout, proc.stdin, within=60)
    await proc.wait()
    return time.perf_counter() - began, peer.set_vars.get("PREPAID_STATUS") == "ALLOWED"


async def _process(conf: Path) -> dict[str, float]:
    latencies: list[float] = []
    failed = 0
    counter = iter(range(PROCESS_CALLS))

    async def worker() -> None:
        nonlocal failed
        for n in counter:
            took, ok = await _process_call(conf, n)
            latencies.append(took)
            failed += not ok

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(PROCESS_CONCURRENCY)))
    return _figures(latencies, PROCESS_CALLS, time.perf_counter() - began, failed)


async def _prepare(store: Store) -> None:
    await store.rates.replace(parse_csv(DECK))
    for i in range(ACCOUNTS):
        await store.ledger.create_account(f"b{i}", currency="EUR")
        await store.ledger.credit(f"b{i}", 10**12, key="seed")


async def run_async(url: str, conf: Path) -> dict[str, Any]:
    base = config.parse({"redis": {"url": url}}, "<bench>", env={})
    settings = dataclasses.replace(base, agi=dataclasses.replace(base.agi, timeout=10.0))
    store = await open_store(settings)
    server = AgiServer(store, host="127.0.0.1", port=0, max_connections=10_000)
    await server.start()
    # A healthy metering listener beats meanwhile, as in production: authorization asks
    # for its heartbeat (one Redis read per half second per FastAGI server, one per process
    # AGI call).
    beating = asyncio.Event()
    heartbeat = asyncio.create_task(Heartbeat(store.redis, "prepaid", "",
                                              lambda: ("up", 0)).run(beating))
    try:
        await _prepare(store)
        offered = await _offered(server.port)
        saturated = await _saturation(server.port)
        apart = await _saturation_apart(server.port)
        process = await _process(conf)
    finally:
        beating.set()
        await heartbeat
        await server.close()
        await store.close()
    out: dict[str, Any] = {}
    for name, figures in (("fastagi_offered", offered), ("fastagi_saturation", saturated),
                          ("fastagi_apart", apart), ("process_agi", process)):
        out.update({f"{name}_{k}": v for k, v in figures.items()})
    out["offered_rate"] = OFFERED_RATE
    out["concurrency"] = CONCURRENCY
    out["process_concurrency"] = PROCESS_CONCURRENCY
    return out


def run() -> dict[str, Any]:
    server = RedisServer()
    server.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            conf = Path(tmp) / "prepaid.toml"
            conf.write_text(f'[redis]\nurl = "{server.url}"\n[agi]\ntimeout = 10.0\n')
            return asyncio.run(run_async(server.url, conf))
    finally:
        server.cleanup()


def main() -> None:
    figures = run()
    rows = [("FastAGI, offered", "fastagi_offered"), ("FastAGI, saturation", "fastagi_saturation"),
            ("process AGI", "process_agi")]
    print(f"{'route':<22}{'calls/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'failed':>8}")
    for label, key in rows:
        print(f"{label:<22}{figures[f'{key}_calls_per_s']:>10}{figures[f'{key}_p50_ms']:>10}"
              f"{figures[f'{key}_p99_ms']:>10}{figures[f'{key}_failed']:>8}")
    print(f"(offered load {OFFERED_RATE}/s for {OFFERED_SECONDS} s; saturation with "
          f"{CONCURRENCY} concurrent calls; process AGI with {PROCESS_CONCURRENCY})")


if __name__ == "__main__":
    main()
