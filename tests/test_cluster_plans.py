"""Plans on a real 3-primary Redis Cluster: the tests of tests/test_plans.py again with
``redis_url`` on the cluster (decks, accounts on plans, FastAGI authorization by plan,
the currency refusal, a live call keeping its rate)."""

from __future__ import annotations

from tests import test_plans as single_redis
from tests.cluster_fixtures import cluster, cluster_url, redis_url, reused_tests  # noqa: F401
from tests.conftest import Run, run  # noqa: F401
from tests.test_plans import agi, decks  # noqa: F401

# A plan's lookup counted in commandstats is one node's figure: tested on one Redis.
_REUSED = {k: v for k, v in reused_tests(single_redis).items()
           if k != "test_each_plan_has_its_own_deck_and_a_lookup_stays_one_hmget"}
assert len(_REUSED) >= 8, "tests/test_plans.py changed shape"
globals().update(_REUSED)
