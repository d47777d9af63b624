"""Fixtures for the Redis Cluster tier: one 3-primary cluster for the whole session.

Import the fixtures into a test module (``from tests.cluster_fixtures import ...``).  The
cluster is started on first use and stopped when the interpreter exits; every test gets it
empty (FLUSHALL and SCRIPT FLUSH on each primary).
"""

from __future__ import annotations

import atexit
import inspect
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from types import ModuleType
from typing import Any

import pytest

from prepaid import config
from prepaid.ledger import Ledger
from prepaid.redis_client import connect
from prepaid.store import Store, open_store
from testbed.cluster import Cluster, ClusterUnsupported

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
def redis_url(cluster_url: str) -> str:
    """Import into a module to run its reused single-Redis tests on the cluster instead."""
    return cluster_url


def reused_tests(module: ModuleType, *, needs_single_server: tuple[str, ...] = ("redis_server",)
                 ) -> dict[str, Any]:
    """The test functions of ``module``, to collect again in a cluster module (whose
    ``redis_url``/``ledger`` fixtures point at the cluster); tests that stop and start the
    single redis-server (fixture ``redis_server``) are left out."""
    out = {}
    for name, fn in vars(module).items():
        if name.startswith("test_") and callable(fn):
            params = inspect.signature(fn).parameters
            if not any(p in params for p in needs_single_server):
                out[name] = fn
    return out


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
