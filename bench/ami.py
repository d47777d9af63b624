"""AMI metering throughput: recorded real Asterisk 22 traffic through the listener's meter.

Each round replays every recording once with fresh call references (the calls' Uniqueids
renamed), against a local redis-server started here: parsing from raw bytes, call tracking,
and the ledger calls (lookup, settle, block debits, release, call record).  One process,
one event loop, so one core.  ``python -m bench ami`` or ``python -m bench.ami``.
"""

from __future__ import annotations

import asyncio
import re
import time
import tracemalloc
from typing import Any

from ami_listener.client import END, parse
from ami_listener.protocol import split
from ami_listener.runners import replay
from ami_listener.tracker import (
    US,
    Action,
    CallInfo,
    FindCdr,
    Finish,
    Lookup,
    PayBlock,
    ReleaseHold,
    Report,
    Tracker,
)
from prepaid.ledger import Ledger
from prepaid.rating import Rate, block_cost
from prepaid.redis_client import connect
from testbed.ami_peer import FIXTURES, authorize, load, open_account, recording_meter
from testbed.servers import RedisServer

SHARED = FIXTURES / "shared"
RATE = Rate("39", "per second", per_minute=600_000, connect_fee=50_000, initial=1, increment=1)
PER_MINUTE = Rate("39", "per minute", per_minute=600_000, connect_fee=50_000, initial=60,
                  increment=60)
ROUNDS = 200


_STAMP = re.compile(rb"^Timestamp: (\d+)\.", re.M)


def _renamed(raw: bytes, uids: list[str], run: int, seconds_apart: int = 60) -> bytes:
    """The recording as a new call: Uniqueids unique to this round, 60 s later per round."""
    for uid in uids:
        raw = raw.replace(uid.encode() + b"\r\n", f"{uid}{run:06d}\r\n".encode())
    shift = seconds_apart * run
    return _STAMP.sub(lambda m: b"Timestamp: %d." % (int(m.group(1)) + shift), raw)


def _answer(tracker: Tracker, actions: list[Action], info: CallInfo) -> int:
    """Carry out ``actions`` as an always-successful ledger would, in memory (the tracker's
    side only, so the pure part is what is timed); returns how many."""
    done = 0
    while actions:
        action = actions.pop()
        done += 1
        if isinstance(action, Lookup):
            actions += tracker.attach(action.ref, info)
        elif isinstance(action, PayBlock):
            actions += tracker.paid(action.ref, action.n)
        elif isinstance(action, ReleaseHold):
            tracker.released(action.ref)
        elif isinstance(action, Finish):
            actions += tracker.charged(action.ref)
        elif isinstance(action, Report):
            tracker.finished(action.ref)
        elif isinstance(action, FindCdr):
            actions += tracker.cdr_found(action.ref, None, again=False)
    return done


def parse_and_track(rounds: int = ROUNDS, rate: Rate = RATE) -> dict[str, Any]:
    """The live read path's parser (blocks split at the blank line, panoramisk's
    ``from_line`` behind ami_listener.client.parse) and the tracker, on one core, with
    the ledger's answers given in memory: the goal's "parsing and call tracking"."""
    recordings = []
    for path in sorted(SHARED.glob("*.ami")):
        rec = load(path)
        uids = sorted({m["Uniqueid"] for m in rec.messages if m.get("Uniqueid")},
                      key=len, reverse=True)
        recordings.append((path.read_bytes(), uids))
    # Round after round, as _bench: time only moves forward.
    batch = [_renamed(raw, uids, run) for run in range(rounds) for raw, uids in recordings]
    info = CallInfo("alice", "4930123", rate, hold=block_cost(rate, 1))
    tracker = Tracker()
    events = actions = 0
    started = time.perf_counter()
    for raw in batch:
        for block in raw.split(END):
            msg = parse(block)
            if msg is None or "Event" not in msg:
                continue
            events += 1
            actions += _answer(tracker, tracker.feed(msg), info)
    actions += _answer(tracker, tracker.tick(tracker.now + 60 * US), info)
    elapsed = time.perf_counter() - started
    return {"events": events, "actions": actions, "events_per_second": round(events / elapsed),
            "calls_left": len(tracker.calls)}


def live_call_memory(calls: int = 1000) -> dict[str, Any]:
    """Python heap held by the tracker for ``calls`` answered calls that are still up (the
    recording cut before its first Hangup, renamed per call), per call (tracemalloc)."""
    path = SHARED / "answered-caller-hangs-up.ami"
    rec = load(path)
    uids = sorted({m["Uniqueid"] for m in rec.messages if m.get("Uniqueid")}, key=len,
                  reverse=True)
    raw = path.read_bytes()
    raw = raw[:raw.index(b"Event: Hangup")]
    info = CallInfo("alice", "4930123", RATE, hold=block_cost(RATE, 1))
    # The same times for every call: all up at once.
    blocks = [_renamed(raw, uids, n, seconds_apart=0).split(END) for n in range(calls)]
    tracker = Tracker()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for call_blocks in blocks:
        for block in call_blocks:
            msg = parse(block)
            if msg is not None and "Event" in msg:
                _answer(tracker, tracker.feed(msg), info)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    up = sum(1 for c in tracker.calls.values() if c.answered_us is not None and not c.ended)
    return {"live_calls": up, "tracker_bytes_per_call": round((after - before) / max(up, 1))}


async def _bench(rounds: int) -> dict[str, Any]:
    server = RedisServer()
    server.start()
    client = connect(server.url)
    try:
        ledger = Ledger(client)
        await open_account(ledger, 10**12)
        recordings = []
        for path in sorted(SHARED.glob("*.ami")):
            rec = load(path)
            uids = sorted({m["Uniqueid"] for m in rec.messages if m.get("Uniqueid")},
                          key=len, reverse=True)
            recordings.append((rec, path.read_bytes(), uids))
        # The call history written as in production, each settlement recorded as well.
        meter, recorder = recording_meter(ledger)
        events = calls = 0
        elapsed = 0.0
        for run in range(rounds):
            batch = []
            for rec, raw, uids in recordings:
                ref = f"{rec.ref}{run:06d}"
                await authorize(ledger, ref, rec.channel, rec.number, RATE)
                batch.append(_renamed(raw, uids, run))
            started = time.perf_counter()
            for raw in batch:
                events += await replay(meter, split(raw))
            elapsed += time.perf_counter() - started
            calls += len(batch)
        # The last round's calls still wait for their Cdr events (3 s): let them give up.
        await meter.tick(meter.tracker.now + 60 * US)
        assert meter.errors == 0, "metering errors during the benchmark"
        # Every call whose recording ends it is settled (ringing-caller-abandons stops
        # while it still rings).
        ending = sum(any(m.get("Event") == "Hangup" and m.get("Uniqueid") == rec.ref
                         for m in rec.messages) for rec, _, _ in recordings)
        assert len(recorder.settlements) == ending * rounds, "calls left unsettled"
        per_call = events / calls
        return {"events": events, "calls": calls, "events_per_call": round(per_call, 1),
                "events_per_second": round(events / elapsed),
                "calls_per_second": round(calls / elapsed, 1),
                "note": "parse + track + ledger on one core; ~1 block/s per answered call"}
    finally:
        await client.aclose()
        server.cleanup()


def run(rounds: int = ROUNDS) -> dict[str, Any]:
    figures = asyncio.run(_bench(rounds))
    # Per-second blocks (the deck above) are the tracker's worst case; a per-minute deck
    # pays a block a minute.
    figures |= {f"parse_track_{k}": v for k, v in parse_and_track(rounds).items()}
    figures |= {f"parse_track_per_minute_{k}": v
                for k, v in parse_and_track(rounds, PER_MINUTE).items()}
    figures |= {f"memory_{k}": v for k, v in live_call_memory().items()}
    return figures


def main() -> None:
    for key, value in run().items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
