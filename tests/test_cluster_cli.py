"""The prepaid CLI as an admin uses it, on a real 3-primary Redis Cluster: the tests of
tests/test_cli.py again with ``redis_url`` on the cluster, and ``prepaid calls`` reading a
call settled by the meter."""

from __future__ import annotations

import asyncio
import json

from ami_listener.meter import Meter
from ami_listener.runners import replay
from prepaid.ledger import Ledger
from prepaid.money import format_amount
from prepaid.rating import cost
from prepaid.redis_client import connect
from testbed.ami_peer import PER_SECOND, authorize, load, open_account
from tests import test_cli as single_redis
from tests.cluster_fixtures import cluster, cluster_url, redis_url, reused_tests  # noqa: F401
from tests.conftest import Run, run  # noqa: F401
from tests.test_ami_meter import SHARED, START

_REUSED = reused_tests(single_redis)
assert len(_REUSED) >= 6, "tests/test_cli.py changed shape"
globals().update(_REUSED)


def test_calls_lists_a_call_metered_on_the_cluster(run: Run, redis_url: str) -> None:  # noqa: F811
    rec = load(SHARED / "answered-callee-hangs-up.ami")

    async def meter_one_call() -> None:
        client = connect(redis_url)
        ledger = Ledger(client)
        await open_account(ledger, START)
        await authorize(ledger, rec.ref, rec.channel, rec.number, PER_SECOND)
        await replay(Meter(ledger), rec.messages)
        await client.aclose()

    asyncio.run(meter_one_call())
    out = run("calls", "alice", "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert [(c["ref"], c["number"], c["cost"]) for c in data["calls"]] == [
        (rec.ref, rec.number, format_amount(cost(PER_SECOND, 3)))]
