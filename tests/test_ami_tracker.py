"""The pure call tracker and the wire format: no sockets, no Redis, no clock."""

from __future__ import annotations

import random

import pytest

from ami_listener.protocol import Message, MessageSplitter, ProtocolError, action, split
from ami_listener.protocol import timestamp_us as ts
from ami_listener.tracker import (
    CallInfo,
    Cutoff,
    Finish,
    Lookup,
    PayBlock,
    ReleaseHold,
    Tracker,
)
from prepaid.errors import InputError
from prepaid.rating import block_cost
from tests.ami_peer import FIXTURES, PER_SECOND, RECORDINGS, load

SHARED = FIXTURES / "shared"


def run(tracker: Tracker, msgs: list[Message], info: CallInfo,
        credit_for: int = 10**9) -> list[object]:
    """Feed events, answering lookups and payments as the meter would, paying blocks up to
    ``credit_for`` and refusing the rest."""
    out: list[object] = []
    pending = []
    for msg in msgs:
        pending += tracker.feed(msg)
        while pending:
            act = pending.pop(0)
            out.append(act)
            if isinstance(act, Lookup):
                pending += tracker.attach(act.ref, info)
            elif isinstance(act, PayBlock) and act.n <= credit_for:
                pending += tracker.paid(act.ref, act.n)
            elif isinstance(act, PayBlock):
                pending += tracker.refused(act.ref, act.n)
            elif isinstance(act, ReleaseHold):
                tracker.released(act.ref)
            elif isinstance(act, Finish):
                tracker.finished(act.ref)
    return out


def info_for(rec_name: str) -> tuple[list[Message], CallInfo, str]:
    rec = load(SHARED / f"{rec_name}.ami")
    return rec.messages, CallInfo("alice", rec.number, PER_SECOND, 60_000, rec.channel), rec.ref


def test_wire_format_round_trip_and_bounds() -> None:
    data = action("Setvar", "7", Channel="PJSIP/a-1", Variable="TIMEOUT(absolute)", Value="9")
    assert data == (b"Action: Setvar\r\nActionID: 7\r\nChannel: PJSIP/a-1\r\n"
                    b"Variable: TIMEOUT(absolute)\r\nValue: 9\r\n\r\n")
    [msg] = list(split(b"Event: X\r\nChanVariable: A=1\r\nChanVariable: B=2\r\n\r\n"))
    assert msg.event == "X" and msg.variables() == {"A": "1", "B": "2"}
    with pytest.raises(InputError, match="line break"):
        action("Hangup", "1", Channel="x\r\nAction: Originate")
    with pytest.raises(ProtocolError, match="longer than 100"):
        MessageSplitter(max_line=100).line(b"A: " + b"x" * 200)
    assert ts("1795315322.176463") == 1795315322176463 and ts("17.5") == 17500000
    assert ts("soon") is None and ts("1.-2") is None


def test_answered_call_pays_block_by_block_and_finishes_exactly() -> None:
    msgs, info, ref = info_for("answered-caller-hangs-up")
    out = run(Tracker(), msgs, info)
    assert out[0] == Lookup(ref)
    pays = [a for a in out if isinstance(a, PayBlock)]
    assert [p.n for p in pays] == [1, 2, 3, 4, 5]
    assert pays[0].amount == block_cost(PER_SECOND, 1) == 60_000
    assert pays[0].answered_us == 1795315331157716  # DialEnd ANSWER's Timestamp
    [fin] = [a for a in out if isinstance(a, Finish)]
    # Up 4.005 s: Asterisk's billsec is 4, so 4 blocks are billed; the 5th, paid when it
    # started at 4.0 s, is given back at settlement.
    assert (fin.duration, fin.blocks, fin.paid, fin.source) == (4, 4, 5, "events")
    assert fin.ended_us == 1795315335162921 and fin.cause == "Normal Clearing"


def test_busy_call_releases_at_once_and_costs_nothing() -> None:
    msgs, info, ref = info_for("busy")
    out = run(Tracker(), msgs, info)
    kinds = [type(a).__name__ for a in out]
    assert kinds == ["Lookup", "ReleaseHold", "Finish"]
    fin = out[-1]
    assert isinstance(fin, Finish) and (fin.duration, fin.blocks) == (0, 0)


def test_other_channels_of_the_call_are_not_billed() -> None:
    """Local channel halves, the far end and the originate leg all have other Uniqueids."""
    msgs, info, ref = info_for("answered-callee-hangs-up")
    out = run(Tracker(), msgs, info)
    refs = {getattr(a, "ref", None) for a in out}
    assert refs == {ref}


def test_duplicated_shuffled_and_broken_events_never_double_charge() -> None:
    msgs, info, ref = info_for("answered-caller-hangs-up")
    rng = random.Random(7)
    for _ in range(200):
        noisy = [m for m in msgs for _ in range(rng.choice([1, 1, 2]))]
        for _ in range(5):  # a few swaps and mangled copies
            i, j = rng.randrange(len(noisy)), rng.randrange(len(noisy))
            noisy[i], noisy[j] = noisy[j], noisy[i]
        broken = Message(noisy[rng.randrange(len(noisy))])
        broken.pop(rng.choice(list(broken)), None)
        noisy.insert(rng.randrange(len(noisy)), broken)
        noisy.insert(0, Message({"Event": "Hangup", "Uniqueid": "unknown.1"}))
        out = run(Tracker(), noisy, info)
        pays = [a.n for a in out if isinstance(a, PayBlock)]
        assert pays == sorted(set(pays))  # each block asked for once, in order
        fins = [a for a in out if isinstance(a, Finish)]
        assert len(fins) <= 1
        for fin in fins:
            assert fin.blocks <= 5 and fin.duration >= 0


def test_refused_block_cuts_off_once_and_caps_the_bill() -> None:
    msgs, info, ref = info_for("answered-caller-hangs-up")
    out = run(Tracker(), msgs, info, credit_for=2)
    cutoffs = [a for a in out if isinstance(a, Cutoff)]
    assert cutoffs == [Cutoff(ref, info.channel, 3)]
    [fin] = [a for a in out if isinstance(a, Finish)]
    assert (fin.blocks, fin.duration, fin.cutoff, fin.paid) == (3, 3, 3, 2)


def test_time_comes_from_ticks_not_the_clock() -> None:
    msgs, info, ref = info_for("answered-caller-hangs-up")
    answer = next(i for i, m in enumerate(msgs) if m.get("Event") == "DialEnd"
                  and m.get("Uniqueid") == ref)
    tracker = Tracker(warning_seconds=0)
    run(tracker, msgs[:answer + 1], info)
    assert tracker.calls[ref].paid == 1
    start = tracker.now
    assert tracker.tick(start + 1_000_000) == []  # exactly 1 s: block 2 not started yet
    [pay] = [a for a in tracker.tick(start + 1_000_001) if isinstance(a, PayBlock)]
    assert pay.n == 2
    assert tracker.tick(start + 5_000_000) == []  # block 2 still awaiting its result


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.parent.name + "/" + p.stem)
def test_every_recording_from_every_starting_point(path) -> None:
    rec = load(path)
    info = CallInfo("alice", rec.number, PER_SECOND, 60_000, rec.channel)
    for start in range(len(rec.messages)):
        tracker = Tracker()
        for ref_info in [(rec.ref, info)]:
            tracker.begin_listing()
            tracker.attach(*ref_info, resumed=True)
        out = run(tracker, rec.messages[start:], info)
        fins = [a for a in out if isinstance(a, Finish)]
        assert len(fins) <= 1
        pays = [a.n for a in out if isinstance(a, PayBlock)]
        assert pays == sorted(set(pays))
