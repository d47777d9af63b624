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
from typing import Any

from ami_listener.protocol import split
from ami_listener.runners import replay
from ami_listener.tracker import US
from prepaid.ledger import Ledger
from prepaid.rating import Rate
from prepaid.redis_client import connect
from testbed.ami_peer import FIXTURES, authorize, load, open_account, recording_meter
from testbed.servers import RedisServer

SHARED = FIXTURES / "shared"
RATE = Rate("39", "per second", per_minute=600_000, connect_fee=50_000, initial=1, increment=1)
ROUNDS = 200


_STAMP = re.compile(rb"^Timestamp: (\d+)\.", re.M)


def _renamed(raw: bytes, uids: list[str], run: int) -> bytes:
    """The recording as a new call: Uniqueids unique to this round, 60 s later per round."""
    for uid in uids:
        raw = raw.replace(uid.encode() + b"\r\n", f"{uid}{run:06d}\r\n".encode())
    return _STAMP.sub(lambda m: b"Timestamp: %d." % (int(m.group(1)) + 60 * run), raw)


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
    return asyncio.run(_bench(rounds))


def main() -> None:
    for key, value in run().items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
