"""The ledger, the outbox and the rate store on a real 3-primary Redis Cluster.

Every test of tests/test_ledger.py runs here again with ``ledger`` on the cluster
(create, credit/debit/reserve/settle/release, idempotency, 50 concurrent spenders,
history sums, NOSCRIPT recovery), followed by what is cluster-specific.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from prepaid.errors import InputError, StoreUnavailable
from prepaid.ledger import Ledger
from prepaid.ratedeck import Normalisation, parse_csv
from prepaid.ratestore import RateStore
from prepaid.redis_client import connect
from testbed.cluster import Cluster
from testbed.replies import entries
from tests import test_ledger as single_redis
from tests.cluster_fixtures import (  # noqa: F401
    cluster,
    cluster_ledger,
    cluster_url,
    reused_tests,
)

EUR = 1_000_000

# The single-Redis ledger suite, collected again in this module with the cluster ledger.
_REUSED = reused_tests(single_redis)
assert len(_REUSED) >= 10, "tests/test_ledger.py changed shape"
globals().update(_REUSED)


@pytest.fixture
async def ledger(cluster_ledger: Ledger) -> AsyncIterator[Ledger]:  # noqa: F811
    assert isinstance(cluster_ledger.redis, RedisCluster)
    yield cluster_ledger


def slots(keys: list[str]) -> set[int]:
    return {key_slot(k.encode()) for k in keys}


def test_every_script_of_an_account_touches_one_slot(ledger: Ledger) -> None:
    for account in ("a", "1001", "x.y+z@example.org"):
        assert len(slots(ledger.keys(account))) == 1
        assert ledger.account_outbox_key(account) in ledger.keys(account)
    # the accounts really are spread over the cluster
    assert len({key_slot(ledger.account_key(str(i)).encode()) for i in range(50)}) > 40


async def test_the_cluster_url_reaches_every_primary(cluster: Cluster,  # noqa: F811
                                                     ledger: Ledger) -> None:
    ids = [f"acct{i}" for i in range(30)]
    for i in ids:
        await ledger.create_account(i, currency="EUR")
        await ledger.credit(i, 1, key="c")
    owners = {cluster.node_for_key(ledger.account_key(i)).port for i in ids}
    assert len(owners) == 3  # accounts live on all three primaries
    assert sorted(await ledger.list_ids()) == sorted(ids)


async def test_crossing_is_forwarded_to_the_shared_outbox_once(ledger: Ledger) -> None:
    await ledger.create_account("a", currency="EUR", threshold=2 * EUR, action="email")
    await ledger.credit("a", 3 * EUR, key="c")
    results = await asyncio.gather(*(ledger.debit("a", 100_000, key=f"d{i}")
                                     for i in range(20)))
    crossed = [r for r in results if r.crossed]
    assert len(crossed) == 1  # 3.00 -> 1.00: exactly one change went below 2.00
    rows = entries(await ledger.redis.xrange(ledger.outbox_key))
    assert len(rows) == 1
    fields = rows[0][1]
    assert fields == {"account": "a", "crossing": crossed[0].entry, "action": "email",
                      "balance": str(crossed[0].balance), "threshold": str(2 * EUR),
                      "topup_amount": "0"}
    assert await ledger.redis.xlen(ledger.account_outbox_key("a")) == 0  # moved, not copied
    # a retry of the crossing change (same key) forwards nothing new
    again = await ledger.debit("a", 100_000, key=f"d{results.index(crossed[0])}")
    assert again.duplicate and again.crossed
    assert await ledger.redis.xlen(ledger.outbox_key) == 1


async def test_a_crossing_left_behind_is_forwarded_by_a_retry_or_a_sweep(
        ledger: Ledger) -> None:
    """The process died between the ledger script and the forward: the event waits in the
    account's outbox; a retry of the same change, or the sweep, forwards it."""
    for name in ("a", "b"):
        await ledger.create_account(name, currency="EUR", threshold=EUR, action="email")
        await ledger.credit(name, 2 * EUR, key="c")
    # Run the ledger script alone, as a process that died right after it would have.
    for name in ("a", "b"):
        reply = await ledger._ledger(keys=ledger.keys(name),
                                     args=["debit", "d1", str(EUR + 1), "", "", ""])
        assert reply[0] == b"OK" and reply[4] == 1
    assert await ledger.redis.xlen(ledger.outbox_key) == 0
    assert await ledger.redis.xlen(ledger.account_outbox_key("a")) == 1
    # a: the client retries with the same key; the duplicate answer forwards the event
    dup = await ledger.debit("a", EUR + 1, key="d1")
    assert dup.duplicate and dup.crossed
    assert await ledger.redis.xlen(ledger.account_outbox_key("a")) == 0
    # b: nobody retries; too young for the sweep first, then forwarded
    assert await ledger.forward_outbox("b", min_age=60) == 0
    assert await ledger.forward_outbox("b") == 1
    assert await ledger.forward_outbox("b") == 0
    rows = entries(await ledger.redis.xrange(ledger.outbox_key))
    assert sorted(f["account"] for _, f in rows) == ["a", "b"]


async def test_creating_an_account_again_repairs_a_missing_index_entry(ledger: Ledger) -> None:
    await ledger.create_account("a", currency="EUR")
    await ledger.redis.zrem(ledger.index_key, "a")  # a crash between script and ZADD
    with pytest.raises(InputError, match="already exists"):
        await ledger.create_account("a", currency="EUR")
    assert await ledger.list_ids() == ["a"]


async def test_rate_deck_swaps_atomically_on_the_cluster(cluster_url: str) -> None:  # noqa: F811
    client = connect(cluster_url)
    store, reader = RateStore(client), RateStore(client)
    head = "prefix,name,price_per_minute,connect_fee,initial_increment,increment\n"
    one = parse_csv(head + "49,Germany,0.10,0,60,60\n", "one.csv")
    two = parse_csv(head + "49,Germany,0.20,0,60,60\n33,France,0.30,0,60,60\n", "two.csv")
    assert await store.replace(one) == 1
    assert len(await reader.current()) == 1
    await client.script_flush()  # NOSCRIPT on the next swap is recovered from
    assert await store.replace(two) == 2
    assert len(await reader.current()) == 2
    # The replaced version is deleted; only the active deck's hash is left.
    assert [k async for k in client.scan_iter("prepaid:{rates}:deck*")] == [
        b"prepaid:{rates}:deck:2"]
    assert (await reader.lookup("3312", Normalisation())).name == "France"
    await client.aclose()


async def test_a_cluster_url_must_name_nodes() -> None:
    with pytest.raises(InputError, match="must be HOST:PORT"):
        connect("redis+cluster://127.0.0.1:notaport")
    with pytest.raises(InputError, match="no database number"):
        connect("redis+cluster://127.0.0.1:7000/3")


async def test_a_dead_cluster_is_a_store_outage() -> None:
    from testbed.servers import free_port

    client = connect(f"redis+cluster://127.0.0.1:{free_port()}", timeout=0.3)
    with pytest.raises(StoreUnavailable, match="unavailable"):
        await Ledger(client).get("a")
    await client.aclose()
