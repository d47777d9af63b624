"""Fault 5: duplicated and reordered AMI events: no double charge, no negative charge."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from ami_listener.meter import Meter, calls_key
from ami_listener.protocol import Message
from ami_listener.runners import replay
from prepaid.ledger import Ledger
from prepaid.rating import cost
from testbed.ami_peer import PER_SECOND, RECORDINGS, authorize, load, open_account
from testbed.replies import entries
from testbed.servers import RedisServer
from tests.conftest import assert_verified
from tests.faults.conftest import US, lines

START = 10_000_000
# The shared ringing recording stops while the call rings (no Hangup): not a whole call.
WHOLE = [p for p in RECORDINGS if p.parent.name != "shared" or "ringing" not in p.stem]


def shuffled(events: list[Message], window: float, seed: int) -> list[Message]:
    """Each event moved by less than ``window`` places, at random (a seeded shuffle)."""
    rnd = random.Random(seed)
    order = sorted(range(len(events)), key=lambda i: i + rnd.uniform(0, window))
    return [events[i] for i in order]


def variants(events: list[Message]) -> dict[str, list[Message]]:
    out = {"each event twice in a row": [m for m in events for _ in (1, 2)]}
    for window in (3, 8):
        for seed in range(4):
            out[f"sent twice, shuffled within {window}, seed {seed}"] = shuffled(
                events + events, window, seed)
    return out


@pytest.mark.parametrize("path", WHOLE, ids=lambda p: p.parent.name + "/" + p.stem)
async def test_duplicated_and_reordered_events_bill_exactly_once(
        ledger: Ledger, redis_server: RedisServer, path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The whole recording sent twice and shuffled within a window (and each event sent
    twice in a row): the call costs what the rate deck says for its billed duration, once;
    no reservation is left; the call is in the account's call list once."""
    caplog.set_level(logging.DEBUG, logger="ami_listener")
    rec = load(path)
    full = cost(PER_SECOND, rec.billed_duration())
    events = [m for m in rec.messages if "Event" in m]
    for name, msgs in variants(events).items():
        redis_server.flush()
        await open_account(ledger, START)
        await authorize(ledger, rec.ref, rec.channel, rec.number, PER_SECOND)
        meter = Meter(ledger)
        assert await replay(meter, msgs) == 2 * len(events)
        await meter.tick(meter.tracker.now + 60 * US)  # a minute later: nothing more due
        account = await ledger.get("alice")
        if path.stem == "blind-transfer" and "shuffled" in name:
            # Known limit: a transferred call's two CDRs shuffled around its Hangup can bill
            # it one leg short (real AMI posts them in order; docs/faults.md).
            assert START - full <= account.balance < START, name
        else:
            assert account.balance == START - full, name
        assert account.held == 0, name
        assert await ledger.holds("alice") == {}, name
        history = await ledger.history("alice", 1000)
        assert sum(e.amount for e in history) == account.balance, name
        assert all(e.amount <= 0 for e in history if e.kind != "credit"), name
        assert len(entries(await ledger.redis.xrange(calls_key(ledger, "alice")))) == 1, name
        assert rec.ref not in meter.tracker.calls and meter.errors == 0, name
        await assert_verified(ledger)
    # What the admin sees: nothing above DEBUG (the duplicates are counted as oddities).
    assert not lines(caplog, "", logger="ami_listener", level=logging.WARNING)
