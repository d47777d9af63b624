"""Benchmark of the policy engine end to end (not a test).

Event -> sandbox gateway -> ledger credit -> receipt e-mail accepted by a local aiosmtpd.
Starts its own redis-server and SMTP sink.  Prints outbox events processed per second
(a backlog of N crossings, drained by one policy worker and one mail worker) and the
crossing -> credited delay p50/p99 with the worker running (both stamps from Redis's clock:
the ids of the crossing and of the credit in the account history).

    .venv/bin/python -m bench.policy [--accounts 500] [--latency 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from aiosmtpd.controller import Controller

from policy.gateway import SandboxGateway
from policy.mailer import MailWorker
from policy.worker import PolicyWorker
from prepaid.config import parse
from prepaid.store import Store, open_store
from testbed.servers import Mailbox, RedisServer, free_port

EUR = 1_000_000


async def seed(st: Store, ids: list[str]) -> None:
    for acct in ids:
        await st.ledger.create_account(acct, currency="EUR", email=f"{acct}@bench.test")
        await st.ledger.credit(acct, 10 * EUR, key=f"seed:{acct}")
        await st.ledger.update(acct, threshold=str(5 * EUR), action="topup",
                               topup_amount=str(20 * EUR), policy_enabled="1",
                               card_token="tok_ok", card_brand="visa", card_last4="4242",
                               card_exp="12/39")


def ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


async def throughput(st: Store, box: Mailbox, n: int) -> float:
    ids = [f"t{i}" for i in range(n)]
    await seed(st, ids)
    for i in range(0, n, 50):  # in bursts the connection pool can take
        await asyncio.gather(*(st.ledger.debit(a, 6 * EUR, key=f"x:{a}")
                               for a in ids[i:i + 50]))
    worker = PolicyWorker(st.redis, st.ledger, st.settings,
                          SandboxGateway(st.redis, st.ledger.prefix), consumer="bench")
    mailer = MailWorker(st.redis, st.settings.smtp, prefix=st.ledger.prefix, consumer="bench")
    start = time.perf_counter()
    done = 0
    while done < n:
        done += await worker.process_batch(block_ms=100)
    sent = 0
    while sent < n:
        sent += await mailer.process_batch(block_ms=100)
    elapsed = time.perf_counter() - start
    assert len(box.messages) >= n
    for a in ids[:10]:
        assert (await st.ledger.get(a)).balance == 24 * EUR
    return n / elapsed


async def latency(st: Store, n: int) -> list[float]:
    from policy.worker import run

    ids = [f"l{i}" for i in range(n)]
    await seed(st, ids)
    stop = asyncio.Event()
    task = asyncio.create_task(run(st, stop))
    delays: list[float] = []
    try:
        for a in ids:
            crossing = await st.ledger.debit(a, 6 * EUR, key=f"x:{a}")
            deadline = time.monotonic() + 10
            while True:
                hist = await st.ledger.history(a, 1)
                if hist and hist[0].kind == "credit":
                    delays.append(ms(hist[0].id) - ms(crossing.entry))
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"account {a} was not topped up within 10 s")
                await asyncio.sleep(0.001)
    finally:
        stop.set()
        await task
    return delays


async def amain(accounts: int, samples: int) -> dict[str, float]:
    redis = RedisServer()
    redis.start()
    box = Mailbox()
    smtp = Controller(box, hostname="127.0.0.1", port=free_port())
    smtp.start()
    settings = parse({"redis": {"url": redis.url},
                      "smtp": {"host": "127.0.0.1", "port": smtp.port},
                      "policy": {"daily_topups": 100, "daily_topup_amount": "100000"}}, env={})
    st = await open_store(settings)
    try:
        rate = await throughput(st, box, accounts)
        delays = sorted(await latency(st, samples))
        p50 = statistics.median(delays)
        p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
        print(f"policy: {accounts} crossings end to end (gateway, credit, e-mail accepted): "
              f"{rate:.0f} events/s")
        print(f"policy: crossing -> credited delay over {samples} calls: p50 {p50:.0f} ms, "
              f"p99 {p99:.0f} ms")
        return {"crossings": accounts, "events_per_s": round(rate, 1),
                "delay_samples": samples, "crossing_to_credit_p50_ms": round(p50, 1),
                "crossing_to_credit_p99_ms": round(p99, 1)}
    finally:
        await st.close()
        smtp.stop()
        redis.cleanup()


def run() -> dict[str, float]:
    """For ``python -m bench``: the defaults of the command line."""
    return asyncio.run(amain(500, 200))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=500)
    parser.add_argument("--latency", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(amain(args.accounts, args.latency))


if __name__ == "__main__":
    main()
