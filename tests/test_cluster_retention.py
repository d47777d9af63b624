"""Bounded data on a real 3-primary Redis Cluster: the tests of tests/test_retention.py
again with ``redis_url`` on the cluster (buckets in the account's slot, archive over SCAN of
every node)."""

from __future__ import annotations

from tests import test_retention as single_redis
from tests.cluster_fixtures import cluster, cluster_url, redis_url, reused_tests  # noqa: F401
from tests.conftest import ledger, run  # noqa: F401

_REUSED = reused_tests(single_redis)
assert len(_REUSED) >= 10, "tests/test_retention.py changed shape"
globals().update(_REUSED)
