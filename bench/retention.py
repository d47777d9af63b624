"""Redis memory with many calls through one account: without archiving it grows with the
calls; with the idempotency window and ``prepaid archive`` it stays bounded by the window.

Each call is what metering does at the ledger: reserve the first block, settle it, pay a
second block, log the settled call; pipelined (50 at once).  Time is scaled so the bench
runs in seconds: a "day" (an idempotency bucket) is 1 s, the retry window 2 s, and the
archive runs every second for what is older than 2 s.  Memory is ``INFO memory``
``used_memory`` before the first call, half-way and at the end.

Run with ``make bench`` (all benchmarks) or ``python -m bench retention``.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

from redis.commands.core import AsyncScript

from ami_listener.meter import HISTORY_MAX
from ami_listener.tracker import Settlement
from prepaid import keys, lua
from prepaid.archive import Archiver
from prepaid.ledger import Ledger
from prepaid.rating import block_cost, cost, rate_json
from prepaid.redis_client import RedisClient, connect
from testbed.ami_peer import PER_SECOND
from testbed.servers import RedisServer

CALLS = 100_000
CONCURRENCY = 50
BUCKET_S = 1  # a scaled day
WINDOW_S = 2  # the scaled idempotency window and retention
ACCOUNT = "busy"


async def _memory(client: RedisClient) -> int:
    info = await client.info("memory")
    return int(info["used_memory"])


async def _one_call(ledger: Ledger, log: AsyncScript, i: int) -> None:
    ref = f"c{i}"
    hold = f"call:{ref}"
    first, second = block_cost(PER_SECOND, 1), block_cost(PER_SECOND, 2)
    await ledger.reserve(ACCOUNT, hold, first, key=f"auth:{ref}", ref=f"call {ref}")
    await ledger.settle(ACCOUNT, hold, first, key=f"blk:{ref}:1", ref=f"call {ref}")
    await ledger.debit(ACCOUNT, second, key=f"blk:{ref}:2", ref=f"call {ref}")
    s = Settlement(ref, ACCOUNT, "0039", PER_SECOND.prefix, PER_SECOND.name, 1.0, 3.0, 2, 2,
                   cost(PER_SECOND, 2), 2, "16", "events", 0, rate_json(PER_SECOND))
    # Logged in the call history as the meter does (lua.CALLS_LOG); the live-call record,
    # which expires an hour after the call whatever is archived, is left out.
    await log(keys=[keys.account_calls("prepaid", ACCOUNT),
                    keys.account_calls_logged("prepaid", ACCOUNT)],
              args=[ref, f"{time.time():.3f}", str(HISTORY_MAX),
                    *(x for kv in s.fields().items() for x in kv)])


async def _archive_every_second(ledger: Ledger, root: Path, stop: asyncio.Event,
                                moved: list[int]) -> None:
    archiver = Archiver(ledger, root)
    while not stop.is_set():
        before_ms = int((time.time() - WINDOW_S) * 1000)
        result = await archiver.run(before_ms, ACCOUNT)
        moved.append(result.history)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def _run(url: str, calls: int, archiving: bool, root: Path) -> dict[str, Any]:
    client = connect(url, timeout=30)
    await client.flushall()
    ledger = Ledger(client, idempotency_seconds=WINDOW_S, bucket_seconds=BUCKET_S)
    log = client.register_script(lua.CALLS_LOG)
    await ledger.create_account(ACCOUNT, currency="EUR")
    await ledger.credit(ACCOUNT, 10**15, key="seed")
    before = await _memory(client)
    stop = asyncio.Event()
    moved: list[int] = []
    archiver = (asyncio.create_task(_archive_every_second(ledger, root, stop, moved))
                if archiving else None)
    counter = iter(range(calls))
    halfway: list[int] = []

    async def worker() -> None:
        for i in counter:
            await _one_call(ledger, log, i)
            if i == calls // 2:
                halfway.append(await _memory(client))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - start
    stop.set()
    if archiver is not None:
        await archiver
    after = await _memory(client)
    history_len = await client.xlen(ledger.keys(ACCOUNT)[2])
    calls_len = await client.xlen(keys.account_calls("prepaid", ACCOUNT))
    buckets = [k async for k in client.scan_iter(
        match=keys.account_part("prepaid", ACCOUNT, "idem:*"))]
    await client.aclose()
    return {"calls": calls, "seconds": round(elapsed, 2),
            "calls_per_s": round(calls / elapsed),
            "used_memory_before": before, "used_memory_halfway": halfway[0] if halfway else 0,
            "used_memory_after": after, "growth_bytes": after - before,
            "growth_bytes_per_call": round((after - before) / calls, 1),
            "history_entries_in_redis": history_len, "calls_in_redis": calls_len,
            "idempotency_buckets": len(buckets),
            "archived_history_entries": sum(moved)}


def run(calls: int = CALLS) -> dict[str, Any]:
    server = RedisServer()
    server.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            plain = asyncio.run(_run(server.url, calls, False, Path(tmp)))
            bounded = asyncio.run(_run(server.url, calls, True, Path(tmp)))
            archive_bytes = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    finally:
        server.cleanup()
    return {"without_archiving": plain, "with_archiving": bounded,
            "archive_file_bytes": archive_bytes,
            "note": f"time scaled: idempotency bucket {BUCKET_S} s, window and retention "
                    f"{WINDOW_S} s, archive every second"}


def main() -> None:
    print(run())


if __name__ == "__main__":
    main()
