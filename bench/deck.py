"""Rate decks of carrier size: authorization latency with a 10-row and a 1,000,000-row deck,
and what importing the big one takes (time, the import's peak memory).

A lookup is one GET and one HMGET of the number's prefixes, so the authorization p99 with
the big deck should stay within 20% of the small one's (issue 11, part 7). The import runs
as the real ``prepaid rates import`` console script, its peak RSS read from its own rusage.
Run with ``python -m bench deck`` or ``python -m bench.deck``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
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

HEADER = "prefix,name,price_per_minute,connect_fee,initial_increment,increment\n"
SMALL = HEADER + "".join(f"{p},Dest {p},0.06,0.10,60,60\n" for p in
                         ("49", "44", "33", "39", "34", "353", "3538", "1", "61", "81"))
BIG_ROWS = 1_000_000
NUMBER = "004907001234567"  # matches 49 in the small deck, 490700123 in the big one
ACCOUNTS = 50
CALLS = 1000
LOOKUPS = 5000
CONCURRENCY = 20
ROUNDS = 5  # the p99 of each deck is the median of its rounds (the machine is shared)
PREPAID = Path(sys.executable).parent / "prepaid"


def _big_deck(path: Path) -> None:
    with path.open("w") as out:
        out.write(HEADER + "49,Germany,0.06,0.10,60,60\n")
        for n in range(BIG_ROWS - 1):
            out.write(f"49{n:07d},Germany {n},0.06,0.10,60,60\n")


def _import(conf: Path, deck: Path) -> tuple[float, int]:
    """Seconds and peak RSS (MiB) of ``prepaid rates import DECK``."""
    began = time.perf_counter()
    with tempfile.TemporaryFile("w+") as sink:
        proc = subprocess.Popen([str(PREPAID), "--config", str(conf), "rates", "import",
                                 str(deck)], stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        sink.seek(0)
        if proc.returncode:
            raise RuntimeError(f"import failed: {sink.read()[-500:]}")
    return time.perf_counter() - began, usage.ru_maxrss // 1024


async def _authorize(port: int) -> list[float]:
    latencies: list[float] = []
    counter = iter(range(CALLS))

    async def worker() -> None:
        for n in counter:
            peer = AgiPeer(agi_env(f"d{time.monotonic_ns()}.{n}", NUMBER,
                                   callerid=f"d{n % ACCOUNTS}"))
            began = time.perf_counter()
            await peer.call(port)
            latencies.append(time.perf_counter() - began)
            if peer.set_vars.get("PREPAID_STATUS") != "ALLOWED":
                raise RuntimeError(f"call refused: {peer.set_vars}")

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return latencies


async def _server(url: str, prefix: str) -> tuple[Store, AgiServer]:
    base = config.parse({"redis": {"url": url, "key_prefix": prefix}}, "<bench>", env={})
    settings = dataclasses.replace(base, agi=dataclasses.replace(base.agi, timeout=10.0))
    store = await open_store(settings)
    server = AgiServer(store, host="127.0.0.1", port=0, max_connections=10_000)
    await server.start()
    for i in range(ACCOUNTS):
        await store.ledger.create_account(f"d{i}", currency="EUR")
        await store.ledger.credit(f"d{i}", 10**12, key="seed")
    return store, server


async def _measure(url: str, conf: Path, big: Path) -> dict[str, Any]:
    """Two FastAGI servers on one Redis, one per deck (key prefixes "small" and "big"),
    measured in alternating rounds so the shared machine's noise falls on both alike."""
    small_store, small_server = await _server(url, "small")
    big_store, big_server = await _server(url, "big")
    beating = asyncio.Event()
    hearts = [asyncio.create_task(Heartbeat(st.redis, st.settings.redis.key_prefix, "",
                                            lambda: ("up", 0)).run(beating))
              for st in (small_store, big_store)]
    try:
        await small_store.rates.replace(parse_csv(SMALL))
        seconds, peak = await asyncio.to_thread(_import, conf, big)
        p99: dict[str, list[float]] = {"small": [], "big": []}
        p50: dict[str, list[float]] = {"small": [], "big": []}
        for server in (small_server, big_server):
            await _authorize(server.port)  # warm: connections, scripts, the deck version
        for _ in range(ROUNDS):
            for name, server in (("small", small_server), ("big", big_server)):
                lat = await _authorize(server.port)
                p99[name].append(percentile(lat, 99) * 1000)
                p50[name].append(percentile(lat, 50) * 1000)
        # The lookup alone, without the AGI around it: sequential, alternating decks.
        norm = small_store.settings.billing.normalisation
        looked: dict[str, list[float]] = {"small": [], "big": []}
        for _ in range(LOOKUPS):
            for name, st in (("small", small_store), ("big", big_store)):
                began = time.perf_counter()
                await st.rates.lookup(NUMBER, norm)
                looked[name].append(time.perf_counter() - began)
        rows = await big_store.redis.hlen(big_store.rates.deck_key(
            await big_store.rates.version()))
    finally:
        beating.set()
        await asyncio.gather(*hearts)
        for st, server in ((small_store, small_server), (big_store, big_server)):
            await server.close()
            await st.close()

    def mid(values: list[float]) -> float:
        return round(sorted(values)[len(values) // 2], 2)

    return {"small_deck_rows": 10, "big_deck_rows": int(rows) - 1,
            "small_deck_p50_ms": mid(p50["small"]), "small_deck_p99_ms": mid(p99["small"]),
            "big_deck_p50_ms": mid(p50["big"]), "big_deck_p99_ms": mid(p99["big"]),
            "big_over_small_p99": round(mid(p99["big"]) / mid(p99["small"]), 3),
            "p99_rounds_small_ms": [round(v, 1) for v in p99["small"]],
            "p99_rounds_big_ms": [round(v, 1) for v in p99["big"]],
            "lookup_small_p99_ms": round(percentile(looked["small"], 99) * 1000, 3),
            "lookup_big_p99_ms": round(percentile(looked["big"], 99) * 1000, 3),
            "import_seconds": round(seconds, 1), "import_peak_rss_mib": peak,
            "calls_per_round": CALLS, "concurrency": CONCURRENCY}


def run() -> dict[str, Any]:
    server = RedisServer()
    server.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            conf = Path(tmp) / "prepaid.toml"
            conf.write_text(f'[redis]\nurl = "{server.url}"\ntimeout = 30.0\n'
                            'key_prefix = "big"\n')
            big = Path(tmp) / "big.csv"
            _big_deck(big)
            return asyncio.run(_measure(server.url, conf, big))
    finally:
        server.cleanup()


def main() -> None:
    for key, value in run().items():
        print(f"{key:<24}{value}")


if __name__ == "__main__":
    main()
