"""FastAGI authorization on a real 3-primary Redis Cluster: the tests of
tests/test_agi_fastagi.py again (all but the single-server outage ones), with ``redis_url``
pointing at the cluster, plus the call record and the hold landing in different slots."""

from __future__ import annotations

from redis.asyncio.cluster import RedisCluster

from agi.server import AgiServer
from prepaid.health import beat, meter_key, read_all
from prepaid.store import Store
from testbed.agi_peer import GET_CALLER, AgiPeer, agi_env, variable_commands
from testbed.cluster import Cluster
from tests import test_agi_fastagi as single_redis
from tests.cluster_fixtures import cluster, cluster_url, redis_url, reused_tests  # noqa: F401
from tests.test_agi_fastagi import EUR, account, agi  # noqa: F401

_REUSED = reused_tests(single_redis)
assert len(_REUSED) >= 15, "tests/test_agi_fastagi.py changed shape"
globals().update(_REUSED)


async def test_authorization_spans_slots_of_three_primaries(
        cluster: Cluster, agi: tuple[Store, AgiServer]) -> None:  # noqa: F811
    store, server = agi
    assert isinstance(store.redis, RedisCluster)
    refs = [f"1700000100.{i}" for i in range(12)]
    owners = set()
    for i, ref in enumerate(refs):
        ident = f"10{i:02d}"
        await account(store, ident, EUR)
        peer = AgiPeer(agi_env(ref, "00491701234567", callerid=ident),
                       variables={"CHANNEL(linkedid)": ref})
        commands = await peer.call(server.port)
        assert commands == [GET_CALLER, *variable_commands(
            "ALLOWED", "", ident, ref, "900", "900000:60000")]
        assert await store.ledger.holds(ident) == {f"call:{ref}": 160_000}
        record = await store.redis.hgetall(f"prepaid:callref:{ref}")
        assert record[b"account"] == ident.encode() and record[b"state"] == b"authorized"
        owners.add(cluster.node_for_key(f"prepaid:callref:{ref}").port)
        owners.add(cluster.node_for_key(store.ledger.account_key(ident)).port)
    assert len(owners) == 3  # records and accounts on every primary


async def test_metering_heartbeats_of_servers_on_every_primary_are_read_and_listed(
        cluster: Cluster, agi: tuple[Store, AgiServer]) -> None:  # noqa: F811
    store, server = agi
    names = [f"pbx-{i}" for i in range(9)]
    for name in names:
        await beat(store.redis, "prepaid", name, state="up", backlog=1)
    owners = {cluster.node_for_key(meter_key("prepaid", n)).port for n in names}
    assert len(owners) == 3  # one key each, on every primary
    listed = await read_all(store.redis, "prepaid", also="pbx-x")
    assert {(b.system_name, b.state) for b in listed} == {
        *((n, "up") for n in names), ("pbx-x", "missing")}
    assert all(b.age < 5 for b in listed if b.state == "up")
