"""Fixtures for the Redis Cluster tier: one 3-primary cluster for the whole session.

Import the fixtures into a test module (``from tests.cluster_fixtures import ...``).  The
cluster is started on first use and stopped when the interpreter exits; every test gets it
empty (FLUSHALL and SCRIPT FLUSH on each primary).
"""

from __future__ import annotations

import atexit
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import pytest

from prepaid import config
from prepaid.ledger import Ledger, connect
from prepaid.store import Store, open_store
from tests.cluster import Cluster, ClusterUnsupported

_shared: Cluster | None = None


def shared_cluster() -> Cluster:
    """The session's cluster (3 primaries, no replicas), started once."""
    global _shared
    if _shared is None:
        c = Cluster(primaries=3)
        try:
            c.start()
        except ClusterUnsupported as exc:
            pytest.skip(f"redis-server has no cluster support: {exc}")
        atexit.register(c.cleanup)
        _shared = c
    return _shared


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    yield shared_cluster()


@pytest.fixture
def cluster_url(cluster: Cluster) -> str:
    cluster.flush()
    return cluster.url


@pytest.fixture
async def cluster_ledger(cluster_url: str) -> AsyncIterator[Ledger]:
    client = connect(cluster_url)
    yield Ledger(client, url=cluster_url)
    await client.aclose()


def cluster_settings(url: str, **sections: object) -> config.Settings:
    """Default settings pointed at the cluster; ``sections`` replace whole sections."""
    base = config.parse({})
    return replace(base, redis=replace(base.redis, url=url), **sections)  # type: ignore[arg-type]


@pytest.fixture
async def cluster_store(cluster_url: str) -> AsyncIterator[Store]:
    store = await open_store(cluster_settings(cluster_url))
    yield store
    await store.close()
