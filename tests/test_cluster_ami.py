"""AMI metering of recorded Asterisk traffic on a real 3-primary Redis Cluster.

The tests of tests/test_ami_meter.py run again with ``ledger`` on the cluster; then a
settlement interrupted between its one-slot steps (call record, account history, record
marked ended) is completed by the restarted listener, never lost and never doubled.
"""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from ami_listener.meter import Meter, calls_key, logged_key
from ami_listener.runners import replay
from prepaid import callrecord
from prepaid.callrecord import record_key
from prepaid.ledger import Ledger
from prepaid.rating import cost
from testbed.ami_peer import PER_SECOND, authorize, load, open_account
from testbed.replies import entries
from tests import test_ami_meter as single_redis
from tests.cluster_fixtures import cluster, cluster_url, redis_url, reused_tests  # noqa: F401
from tests.conftest import assert_verified
from tests.test_ami_meter import SHARED, START

_REUSED = reused_tests(single_redis)
assert len(_REUSED) >= 5, "tests/test_ami_meter.py changed shape"
globals().update(_REUSED)


class Crash(BaseException):
    """Stands for the listener process dying: nothing in the meter catches it."""


async def crash(*_: Any, **__: Any) -> None:
    raise Crash()


async def logged(ledger: Ledger) -> list[dict[str, str]]:
    return [f for _, f in entries(await ledger.redis.xrange(calls_key(ledger, "alice")))]


async def test_the_call_record_and_the_account_are_in_different_slots(
        ledger: Ledger) -> None:
    assert isinstance(ledger.redis, RedisCluster)
    rec = load(SHARED / "answered-callee-hangs-up.ami")
    # So settling this call crosses slots: one script for both would be refused (CROSSSLOT).
    assert key_slot(record_key("prepaid", rec.ref).encode()) != key_slot(
        calls_key(ledger, "alice").encode())
    assert key_slot(calls_key(ledger, "alice").encode()) == key_slot(
        logged_key(ledger, "alice").encode()) == key_slot(ledger.account_key("alice").encode())


@pytest.mark.parametrize("step", ["_log", "ended"])
async def test_a_settlement_cut_short_is_completed_after_a_restart(
        ledger: Ledger, step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = load(SHARED / "answered-callee-hangs-up.ami")
    await open_account(ledger, START)
    await authorize(ledger, rec.ref, rec.channel, rec.number, PER_SECOND)
    dying = Meter(ledger)
    with monkeypatch.context() as patch:
        # Dies before logging the call / before marking it ended.
        if step == "_log":
            patch.setattr(dying.history, "_log", crash)
        else:
            patch.setattr(callrecord, "ended", crash)
        with pytest.raises(Crash):
            await replay(dying, rec.messages)
    charged = START - cost(PER_SECOND, 3)
    assert (await ledger.get("alice")).balance == charged  # the money steps were done
    record = await ledger.redis.hgetall(record_key("prepaid", rec.ref))
    assert b"finished" in record and record[b"state"] != b"ended"
    assert len(await logged(ledger)) == (0 if step == "_log" else 1)

    restarted = Meter(ledger)
    assert await restarted.recover() == 0  # nothing live to resume ...
    [call] = await logged(ledger)  # ... but the settled call is in the history, once
    assert call["ref"] == rec.ref and int(call["cost"]) == cost(PER_SECOND, 3)
    assert await ledger.redis.hget(record_key("prepaid", rec.ref), "state") == b"ended"
    assert await ledger.redis.zrange(logged_key(ledger, "alice"), 0, -1) == [rec.ref.encode()]

    await replay(Meter(ledger), rec.messages)  # the same traffic once more changes nothing
    assert (await ledger.get("alice")).balance == charged
    assert len(await logged(ledger)) == 1
    await assert_verified(ledger)
