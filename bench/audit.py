"""``prepaid verify``'s rate: accounts audited per second, each with a short history and a
settled call in its call history (the hourly run's cost).

Run with ``make bench`` (all benchmarks) or ``python -m bench audit``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ami_listener.meter import CallHistory
from ami_listener.tracker import Settlement
from prepaid.audit import Audit
from prepaid.ledger import Ledger
from prepaid.rating import block_cost, cost, rate_json
from prepaid.redis_client import connect
from testbed.ami_peer import PER_SECOND
from testbed.servers import RedisServer

ACCOUNTS = 5_000
ENTRIES = 10  # history entries per account (open, a top-up, debits, a call's block)


async def _account(ledger: Ledger, history: CallHistory, n: int) -> None:
    account = f"a{n}"
    await ledger.create_account(account, currency="EUR")
    await ledger.credit(account, 10_000_000, key="seed")
    for i in range(ENTRIES - 3):
        await ledger.debit(account, 1_000, key=f"d{i}")
    ref = f"call-{n}"
    await ledger.debit(account, block_cost(PER_SECOND, 1), key=f"blk:{ref}:1", ref=f"call {ref}")
    s = Settlement(ref, account, "0039", PER_SECOND.prefix, PER_SECOND.name, 1.0, 2.0, 1, 1,
                   cost(PER_SECOND, 1), 1, "16", "events", 0, rate_json(PER_SECOND))
    await history.complete(ref, account, s.fields())


async def _bench(url: str, accounts: int) -> dict[str, Any]:
    client = connect(url, timeout=30)
    ledger = Ledger(client)
    history = CallHistory(ledger)
    sem = asyncio.Semaphore(50)

    async def one(n: int) -> None:
        async with sem:
            await _account(ledger, history, n)

    await asyncio.gather(*(one(n) for n in range(accounts)))
    audit = Audit(ledger)
    start = time.perf_counter()
    found = [m async for m in audit.run()]
    elapsed = time.perf_counter() - start
    await client.aclose()
    if found or audit.accounts != accounts:
        raise RuntimeError(f"verify of a healthy ledger: {audit.accounts} accounts, {found[:3]}")
    return {"accounts": accounts, "entries_per_account": ENTRIES, "seconds": round(elapsed, 3),
            "accounts_per_s": round(accounts / elapsed)}


def run(accounts: int = ACCOUNTS) -> dict[str, Any]:
    server = RedisServer()
    server.start()
    try:
        return asyncio.run(_bench(server.url, accounts))
    finally:
        server.cleanup()


def main() -> None:
    print(run())


if __name__ == "__main__":
    main()
