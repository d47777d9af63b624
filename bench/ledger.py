"""Ledger operations per second through the real scripts, next to redis-benchmark's EVALSHA.

Run with ``make bench`` (all benchmarks) or ``python -m bench ledger``.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from typing import Any

from prepaid.ledger import Ledger
from prepaid.redis_client import connect
from testbed.servers import RedisServer

OPS = 20_000
CONCURRENCY = 50


async def _ledger_ops(url: str) -> dict[str, float]:
    client = connect(url, timeout=30)
    ledger = Ledger(client)
    await ledger.create_account("bench", currency="EUR")
    await ledger.credit("bench", 10**12, key="seed")
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(OPS):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            kind = i % 4
            if kind == 0:
                await ledger.debit("bench", 123, key=f"d{i}")
            elif kind == 1:
                await ledger.reserve("bench", f"h{i}", 456, key=f"r{i}")
            elif kind == 2:
                await ledger.settle("bench", f"h{i - 1}", 400, key=f"s{i}")
            else:
                await ledger.credit("bench", 1, key=f"c{i}")

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - start
    history = await ledger.history("bench", limit=OPS + 10)
    acct = await ledger.get("bench")
    await client.aclose()
    assert sum(e.amount for e in history) == acct.balance, "history does not sum to balance"
    return {"ops": OPS, "seconds": elapsed, "ops_per_s": OPS / elapsed}


async def _python_evalsha(url: str) -> float:
    """The same client and concurrency running a trivial script: the client's own ceiling."""
    client = connect(url, timeout=30)
    script = client.register_script("return 1")
    counter = iter(range(OPS))

    async def worker() -> None:
        for _ in counter:
            await script(keys=[], args=[])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - start
    await client.aclose()
    return OPS / elapsed


def _redis_benchmark(port: int) -> float:
    import redis
    sha = redis.Redis(port=port).script_load("return 1")
    out = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-n", str(OPS * 5), "-c", str(CONCURRENCY), "-q",
         "EVALSHA", sha, "0"], capture_output=True, text=True, check=True).stdout
    match = re.findall(r"([0-9.]+) requests per second", out)
    if not match:
        raise RuntimeError(f"unexpected redis-benchmark output: {out!r}")
    return float(match[-1])


def run() -> dict[str, Any]:
    server = RedisServer()
    server.start()
    try:
        ours = asyncio.run(_ledger_ops(server.url))
        plain = _redis_benchmark(server.port)
        client_ceiling = asyncio.run(_python_evalsha(server.url))
    finally:
        server.cleanup()
    return {
        "ledger_ops_per_s": round(ours["ops_per_s"]),
        "plain_evalsha_per_s": round(plain),
        "ratio": round(ours["ops_per_s"] / plain, 3),
        "python_client_evalsha_per_s": round(client_ceiling),
        "ratio_to_python_client": round(ours["ops_per_s"] / client_ceiling, 3),
        "ops": OPS, "concurrency": CONCURRENCY,
        "note": "ledger: redis-py asyncio client, one process; EVALSHA: redis-benchmark (C)",
    }
