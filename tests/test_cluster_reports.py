"""Outcomes, reports and exports on a real 3-primary Redis Cluster: the tests of
tests/test_agi_outcomes.py and tests/test_reports.py again with ``redis_url`` pointing at the
cluster (each account's keys in its own slot, the shared stream of unknown accounts in
another; the report and the exports walk them all)."""

from __future__ import annotations

from tests import test_agi_outcomes, test_reports
from tests.cluster_fixtures import cluster, cluster_url, redis_url, reused_tests  # noqa: F401
from tests.conftest import run  # noqa: F401
from tests.test_agi_outcomes import agi  # noqa: F401
from tests.test_reports import business  # noqa: F401

_REUSED = {**reused_tests(test_agi_outcomes), **reused_tests(test_reports)}
assert len(_REUSED) >= 10, "tests/test_agi_outcomes.py or tests/test_reports.py changed shape"
globals().update(_REUSED)
