"""The policy worker and mailer on a real 3-primary Redis Cluster, with a real SMTP server.

The tests of tests/test_policy_worker.py run again with ``redis_url`` on the cluster (among
them: one e-mail per crossing with 20 concurrent debits crossing together), then the
outbox forwarding: a crossing forwarded twice is acted on once, and one a dead process
left in the account's own outbox is found by the sweep of a running worker.
"""

from __future__ import annotations

import asyncio

from redis.asyncio.cluster import RedisCluster
from redis.typing import EncodableT

from policy.gateway import SandboxGateway
from prepaid.ledger import Ledger
from prepaid.store import Store
from testbed.replies import entries
from tests import test_policy_worker as single_redis
from tests.cluster_fixtures import cluster, cluster_url, redis_url, reused_tests  # noqa: F401
from tests.test_policy_support import (  # noqa: F401
    EUR,
    Smtp,
    mailer,
    new_account,
    smtp,
    store,
    wait_until,
    worker,
)

_REUSED = reused_tests(single_redis)
assert len(_REUSED) >= 14, "tests/test_policy_worker.py changed shape"
globals().update(_REUSED)


async def cross_and_die(ledger: Ledger, account: str, amount: int, key: str) -> str:
    """Run the ledger script alone: a process that died right after it, before forwarding.
    Returns the crossing (history entry) id."""
    reply = await ledger._ledger(keys=ledger.keys(account),
                                 args=["debit", key, str(amount), "call", "", ""])
    assert reply[0] == b"OK" and reply[4] == 1, reply
    return str(reply[3].decode())


async def forward_without_delete(ledger: Ledger, account: str) -> None:
    """The first half of a forward (XADD to the shared outbox), then the process dies."""
    [(_, fields)] = entries(await ledger.redis.xrange(ledger.account_outbox_key(account)))
    row: dict[EncodableT, EncodableT] = {k: v for k, v in fields.items()}
    await ledger.redis.xadd(ledger.outbox_key, row)


async def test_a_crossing_forwarded_twice_sends_one_email(store: Store,  # noqa: F811
                                                          smtp: Smtp) -> None:  # noqa: F811
    assert isinstance(store.redis, RedisCluster)
    await new_account(store, action="email", token="")
    crossing = await cross_and_die(store.ledger, "1001", 6 * EUR, "d1")
    await forward_without_delete(store.ledger, "1001")
    assert await store.ledger.forward_outbox("1001") == 1  # the sweep forwards it again
    rows = entries(await store.redis.xrange(store.ledger.outbox_key))
    assert [f["crossing"] for _, f in rows] == [crossing, crossing]
    w, m = worker(store), mailer(store)
    assert await w.process_batch() == 2  # both acknowledged ...
    assert await m.process_batch() == 1  # ... but one mail queued
    assert await m.process_batch() == 0
    [msg] = smtp.messages
    assert msg["Subject"] == "Your prepaid balance is low: EUR 4.00"


async def test_a_crossing_forwarded_twice_tops_up_once(store: Store,  # noqa: F811
                                                       smtp: Smtp) -> None:  # noqa: F811
    await new_account(store)  # 10.00, threshold 5.00, top-up 20.00 with tok_ok
    crossing = await cross_and_die(store.ledger, "1001", 6 * EUR, "d1")
    await forward_without_delete(store.ledger, "1001")
    assert await store.ledger.forward_outbox("1001") == 1
    w = worker(store)
    assert await w.process_batch() == 2
    assert (await store.ledger.get("1001")).balance == 4 * EUR + 20 * EUR
    credits = [e for e in await store.ledger.history("1001", 100) if e.kind == "credit"]
    assert [e.amount for e in credits] == [20 * EUR, 10 * EUR]  # the top-up, the seed
    charges = await SandboxGateway(store.redis, store.ledger.prefix).charges("1001")
    assert list(charges) == [f"autotopup:1001:{crossing}"]
    assert await mailer(store).process_batch() == 1
    assert [str(x["Subject"]) for x in smtp.messages] == ["Automatic top-up of EUR 20.00"]


async def test_the_running_worker_sweeps_up_a_crossing_left_behind(
        store: Store, smtp: Smtp) -> None:  # noqa: F811
    await new_account(store, action="email", token="")
    await cross_and_die(store.ledger, "1001", 6 * EUR, "d1")
    w = worker(store, sweep_seconds=0.2, sweep_min_age=0.5)
    m = mailer(store)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop, 50)), asyncio.create_task(m.run(stop, 50))]
    try:
        async def mailed() -> bool:
            return len(smtp.messages) == 1

        await wait_until(mailed, limit=10)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert await store.redis.xlen(store.ledger.account_outbox_key("1001")) == 0
    assert await store.redis.xlen(store.ledger.outbox_key) == 1
    assert smtp.messages[0]["Subject"] == "Your prepaid balance is low: EUR 4.00"

