"""``prepaid verify`` on a real 3-primary Redis Cluster: the tests of tests/test_verify.py
again with ``redis_url`` on the cluster (SCAN on every node, pipelines across slots)."""

from __future__ import annotations

from tests import test_verify as single_redis
from tests.cluster_fixtures import cluster, cluster_url, redis_url, reused_tests  # noqa: F401
from tests.conftest import ledger, run  # noqa: F401

_REUSED = reused_tests(single_redis)
assert len(_REUSED) >= 10, "tests/test_verify.py changed shape"
globals().update(_REUSED)
