"""A primary of a real Redis Cluster (3 primaries, 3 replicas) killed in a debit storm.

kill -9 of the primary that owns the account's slot: its replica takes over, clients retry
with the same idempotency key until the ledger answers.  Afterwards the history still sums
to the balance and no key was applied twice; the acknowledged debits lost with the dead
primary (asynchronous replication) and the pause the clients saw are measured and printed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from prepaid.errors import StoreUnavailable
from prepaid.ledger import Ledger
from prepaid.redis_client import connect
from testbed.cluster import Cluster, ClusterUnsupported
from testbed.replies import entries
from tests.conftest import assert_verified

DEBITS = 300
KILL_AT = 60


@pytest.fixture(scope="module")
def replicated_cluster() -> Iterator[Cluster]:
    c = Cluster(primaries=3, replicas=1, node_timeout_ms=1000)
    try:
        c.start()
    except ClusterUnsupported as exc:
        pytest.skip(f"redis-server has no cluster support: {exc}")
    yield c
    c.cleanup()


async def test_primary_killed_mid_storm_keeps_the_ledger_consistent(
        replicated_cluster: Cluster) -> None:
    cluster = replicated_cluster
    client = connect(cluster.url, timeout=0.5)
    ledger = Ledger(client, url=cluster.url)
    await ledger.create_account("a", currency="EUR")
    await ledger.credit("a", 1_000_000, key="seed")
    victim = cluster.node_for_key(ledger.account_key("a"))
    acknowledged: set[str] = set()
    killed_at: list[float] = []
    pauses: list[float] = []  # per debit: how long its retries took, from the kill on

    async def debit(i: int) -> None:
        deadline = time.monotonic() + 60
        first_failure: float | None = None
        while True:  # a client retries with the same key until the ledger answers
            try:
                await ledger.debit("a", 1_000, key=f"d{i}")
                acknowledged.add(f"d{i}")
                if first_failure is not None:
                    pauses.append(time.monotonic() - max(first_failure, killed_at[0]))
                return
            except StoreUnavailable:
                if first_failure is None:
                    first_failure = time.monotonic()
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)  # back-off between retries, not a wait for luck

    async def worker(ids: range) -> None:
        for i in ids:
            await debit(i)
            if i == KILL_AT:
                killed_at.append(time.monotonic())
                cluster.kill(victim)

    await asyncio.gather(*(worker(range(k, DEBITS, 5)) for k in range(5)))
    assert killed_at, "the primary was never killed"
    heal = await asyncio.to_thread(cluster.wait_healthy, 30.0)
    new_owner = cluster.node_for_key(ledger.account_key("a"))
    assert new_owner is not victim and new_owner.info("replication")["role"] == "master"

    acct = await ledger.get("a")
    raw = entries(await client.xrange(ledger.keys("a")[2]))
    assert sum(int(f["amount"]) for _, f in raw) == acct.balance  # history sums to balance
    applied = [f["key"] for _, f in raw if f["kind"] == "debit"]
    assert len(applied) == len(set(applied)), "an idempotency key was applied twice"
    assert acct.balance == 1_000_000 - 1_000 * len(applied)
    lost = acknowledged - set(applied)
    pause = max(pauses, default=0.0)
    print(f"\ncluster failover: {len(acknowledged)} debits acknowledged, {len(applied)} in "
          f"the ledger, {len(lost)} acknowledged but lost with the killed primary; "
          f"longest client pause {pause:.2f} s; cluster healthy again "
          f"{time.monotonic() - killed_at[0]:.2f} s after the kill (+{heal:.2f} s wait)")
    assert len(acknowledged) == DEBITS  # every client got its answer in the end
    assert len(lost) <= 5, f"lost {len(lost)} acknowledged debits"
    assert pauses, "no client noticed the failover"
    await assert_verified(ledger)
    await client.aclose()
