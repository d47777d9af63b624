"""The pure call tracker and the wire format: no sockets, no Redis, no clock."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ami_listener.protocol import Message, MessageSplitter, ProtocolError, action, split
from ami_listener.protocol import timestamp_us as ts
from ami_listener.tracker import (
    US,
    Action,
    Block,
    CallInfo,
    Cutoff,
    Extend,
    FindCdr,
    Finish,
    Lookup,
    PayBlock,
    ReleaseHold,
    Report,
    Tracker,
)
from prepaid.errors import InputError
from prepaid.rating import block_cost, cost
from testbed.ami_peer import FIXTURES, PER_SECOND, RECORDINGS, load

SHARED = FIXTURES / "shared"


def run(tracker: Tracker, msgs: list[Message], info: CallInfo,
        credit_for: int = 10**9, cdr_file: dict[str, int] | None = None,
        received: list[int] | None = None) -> list[object]:
    """Feed events, answering lookups and payments as the meter would, paying blocks up to
    ``credit_for`` and refusing the rest; ``cdr_file`` answers CDR file look-ups."""
    out: list[object] = []
    pending = []
    for i, msg in enumerate(msgs):
        pending += tracker.feed(msg, received[i] if received else None)
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
            elif isinstance(act, FindCdr):
                pending += tracker.cdr_found(act.ref, (cdr_file or {}).get(act.ref))
            elif isinstance(act, Finish):
                pending += tracker.charged(act.ref)
            elif isinstance(act, Report):
                tracker.finished(act.ref)
    return out


def without_cdr(msgs: list[Message]) -> list[Message]:
    return [m for m in msgs if m.get("Event") != "Cdr"]


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
    # Each block is paid 2 s before it starts: up 4.005 s, blocks up to 7 (starting at 6 s).
    assert [p.n for p in pays] == [1, 2, 3, 4, 5, 6, 7]
    assert pays[0].amount == block_cost(PER_SECOND, 1) == 60_000
    assert pays[0].answered_us == 1795315331157716  # DialEnd ANSWER's Timestamp
    [fin] = [a for a in out if isinstance(a, Finish)]
    # The Cdr event says billsec 4: 4 blocks are billed, the 3 paid ahead are given back.
    assert (fin.duration, fin.blocks, fin.paid, fin.source) == (4, 4, 7, "cdr")
    assert fin.ended_us == 1795315335162921 and fin.cause == "Normal Clearing"
    assert fin.charges == () and not fin.release
    assert fin.refunds == tuple(Block(n, block_cost(PER_SECOND, n)) for n in (5, 6, 7))
    [report] = [a for a in out if isinstance(a, Report)]
    assert (report.settlement.blocks, report.settlement.cost) == (4, cost(PER_SECOND, 4))
    # The hard limit follows the paid time, plus the grace should the listener die.
    limits = [a for a in out if isinstance(a, Extend)]
    assert limits and not any(a.exact for a in limits)


def test_the_cdr_wins_over_the_listeners_clock() -> None:
    msgs, info, ref = info_for("answered-caller-hangs-up")
    cdr = next(m for m in msgs if m.get("Event") == "Cdr" and m.get("UniqueID") == ref)
    lying = [Message({**m, "BillableSeconds": "3"}) if m is cdr else m for m in msgs]
    [fin] = [a for a in run(Tracker(), lying, info) if isinstance(a, Finish)]
    assert (fin.duration, fin.blocks, fin.source) == (3, 3, "cdr")


def test_without_a_cdr_event_the_file_then_the_events_decide() -> None:
    msgs, info, ref = info_for("answered-caller-hangs-up")
    plain = without_cdr(msgs)
    end = timestamp_of_last(plain)
    tracker = Tracker()
    out = run(tracker, plain, info)
    assert not [a for a in out if isinstance(a, Finish)]  # waiting for the Cdr event
    out = tick_through(tracker, end, 10 * US, cdr_file={ref: 5})
    [fin] = [a for a in out if isinstance(a, Finish)]
    assert (fin.duration, fin.source) == (5, "cdr")
    tracker = Tracker()
    run(tracker, plain, info)
    out = tick_through(tracker, end, 10 * US, cdr_file={})
    assert sum(isinstance(a, FindCdr) for a in out) == 3  # a second apart: it may be late
    [fin] = [a for a in out if isinstance(a, Finish)]
    assert (fin.duration, fin.source) == (4, "events")


def test_events_without_timestamps_use_the_time_they_were_read() -> None:
    msgs, info, ref = info_for("answered-caller-hangs-up")
    stamps, last = [], 0
    for m in msgs:  # what a clock read with each message would say
        last = ts(m.get("Timestamp", "")) or last
        stamps.append(last)
    bare = [Message({k: v for k, v in m.items() if k != "Timestamp"}) for m in msgs]
    out = run(Tracker(), without_cdr(bare), info, received=[s + 7 for s in stamps])
    assert [p.answered_us for p in out if isinstance(p, PayBlock)][0] == 1795315331157716 + 7


def test_call_that_ended_while_away_is_billed_from_the_cdr_file() -> None:
    msgs, info, ref = info_for("answered-caller-hangs-up")
    answered = CallInfo(info.account, info.number, info.rate, info.hold, info.channel,
                        answered_us=1795315331157716, blocks_paid=3)
    tracker = Tracker()
    tracker.begin_listing()
    tracker.attach(ref, answered, resumed=True)
    out = tracker.feed(Message({"Event": "CoreShowChannelsComplete"}), 1795315345000000)
    assert out == []  # its Cdr event may still come, posted as we reconnected
    assert tracker.tick(1795315345000000 + 3 * US) == [FindCdr(ref)]
    [fin] = tracker.cdr_found(ref, 9)
    assert isinstance(fin, Finish) and (fin.duration, fin.blocks, fin.paid, fin.source) == (
        9, 9, 3, "cdr")


def timestamp_of_last(msgs: list[Message]) -> int:
    return max(ts(m["Timestamp"]) or 0 for m in msgs if "Timestamp" in m)


def tick_through(tracker: Tracker, start: int, span: int,
                 cdr_file: dict[str, int]) -> list[object]:
    out: list[object] = []
    for at in range(start, start + span, US // 4):
        pending = list(tracker.tick(at))
        while pending:
            act = pending.pop(0)
            out.append(act)
            if isinstance(act, FindCdr):
                pending += tracker.cdr_found(act.ref, cdr_file.get(act.ref))
            elif isinstance(act, Finish):
                pending += tracker.charged(act.ref)
            elif isinstance(act, Report):
                tracker.finished(act.ref)
    return out


def test_busy_call_releases_at_once_and_costs_nothing() -> None:
    msgs, info, ref = info_for("busy")
    out = run(Tracker(), msgs, info)
    kinds = [type(a).__name__ for a in out]
    assert kinds == ["Lookup", "ReleaseHold", "Finish", "Report"]
    fin = out[-2]
    assert isinstance(fin, Finish) and (fin.duration, fin.blocks) == (0, 0)
    assert (fin.charges, fin.refunds, fin.release) == ((), (), True)


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


def test_refused_block_sets_the_exact_limit_and_the_cdr_decides() -> None:
    msgs, info, ref = info_for("answered-caller-hangs-up")
    out = run(Tracker(), msgs, info, credit_for=2)
    # Block 3 is refused ahead of its start: the limit becomes the paid time itself, the
    # block is asked for once more just before it starts, then a hang-up backs the limit.
    assert [a.n for a in out if isinstance(a, PayBlock)] == [1, 2, 3, 3]
    exact = [a for a in out if isinstance(a, Extend) and a.exact]
    assert len(exact) == 1
    assert [a for a in out if isinstance(a, Cutoff)] == [Cutoff(ref, info.channel, 3)]
    # This recorded call went on to 4 s (nothing applied the limit): the CDR says so, and
    # the CDR is what is billed.
    [fin] = [a for a in out if isinstance(a, Finish)]
    assert (fin.blocks, fin.duration, fin.cutoff, fin.paid, fin.source) == (4, 4, 3, 2, "cdr")
    # Without any CDR, the listener's own clock is capped at the paid time.
    tracker = Tracker(cdr_wait_us=0)
    out = run(tracker, without_cdr(msgs), info, credit_for=2)
    out += tick_through(tracker, timestamp_of_last(msgs), 5 * US, cdr_file={})
    [fin] = [a for a in out if isinstance(a, Finish)]
    assert (fin.blocks, fin.duration, fin.cutoff, fin.source) == (2, 2, 3, "events")


def test_time_comes_from_ticks_not_the_clock() -> None:
    msgs, info, ref = info_for("answered-caller-hangs-up")
    answer = next(i for i, m in enumerate(msgs) if m.get("Event") == "DialEnd"
                  and m.get("Uniqueid") == ref)
    tracker = Tracker(warning_seconds=0, pay_ahead_us=0)
    run(tracker, msgs[:answer + 1], info)
    assert tracker.calls[ref].paid == 1
    start = tracker.now
    assert tracker.tick(start + 999_999) == []  # block 2 starts at exactly 1 s
    [pay] = [a for a in tracker.tick(start + 1_000_000) if isinstance(a, PayBlock)]
    assert pay.n == 2
    assert tracker.tick(start + 5_000_000) == []  # block 2 still awaiting its result


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.parent.name + "/" + p.stem)
def test_every_recording_from_every_starting_point(path: Path) -> None:
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


def test_blocks_the_cdr_reached_are_owed_and_past_the_credit_mark_the_cutoff() -> None:
    """The settlement is decided here: a call resumed with 3 blocks paid whose CDR says
    9 s owes blocks 4 to 9; those the ledger had to charge past the credit (the meter
    says which) make the first of them the cut-off, counted as overdrawn."""
    msgs, info, ref = info_for("answered-caller-hangs-up")
    answered = CallInfo(info.account, info.number, info.rate, info.hold, info.channel,
                        answered_us=1795315331157716, blocks_paid=3)
    tracker = Tracker()
    tracker.begin_listing()
    tracker.attach(ref, answered, resumed=True)
    tracker.feed(Message({"Event": "CoreShowChannelsComplete"}), 1795315345000000)
    tracker.tick(1795315345000000 + 3 * US)
    [fin] = tracker.cdr_found(ref, 9)
    assert isinstance(fin, Finish)
    assert fin.charges == tuple(Block(n, block_cost(PER_SECOND, n)) for n in range(4, 10))
    assert (fin.refunds, fin.release, fin.cutoff) == ((), False, 0)
    tracker.past_credit(ref, 8)
    tracker.past_credit(ref, 9)
    assert tracker.tick(1795315360000000) == []  # the settlement is under way
    [report] = tracker.charged(ref)
    assert isinstance(report, Report) and report.ref == ref
    s = report.settlement
    assert (s.cutoff, s.blocks, s.duration, s.cost, s.source) == (
        8, 9, 9, cost(PER_SECOND, 9), "cdr")
    assert tracker.overdrawn == 2
    tracker.failed(ref)  # the reporter could not write it: reported again, unchanged
    assert tracker.tick(1795315361000000) == [report]
    tracker.finished(ref)
    assert tracker.calls == {} and tracker.tick(1795315362000000) == []


def test_the_hard_limit_moves_before_its_grace_falls_below_two_thirds_not_every_block() -> None:
    """A 60 s call on a per-second deck: its blocks are paid one a second, but Asterisk's
    hard limit is moved only when the grace it keeps past the paid time has shrunk below
    two thirds (an AMI action every ~10 s, not every second), and never falls below that."""
    tr = Tracker(grace_seconds=30, warning_seconds=0)
    start = 1_000 * US
    tr.tick(start)
    info = CallInfo("alice", "4930123", PER_SECOND, hold=block_cost(PER_SECOND, 1),
                    channel="PJSIP/a-1", answered_us=start)
    extends: list[Extend] = []
    paid = 0

    def carry(actions: list[Action]) -> None:
        nonlocal paid
        while actions:
            a = actions.pop(0)
            if isinstance(a, PayBlock):
                paid = a.n
                actions += tr.paid(a.ref, a.n)
            elif isinstance(a, Extend):
                extends.append(a)
                limit_at = tr.now + a.ms * 1000
                paid_until = start + paid * US  # per second: n blocks cover n seconds
                assert limit_at - paid_until >= 20 * US - US  # two thirds of the grace
    carry(tr.attach("c1", info))
    for ms in range(100, 60_000, 100):
        carry(tr.tick(start + ms * 1000))
    assert paid >= 60
    assert 5 <= len(extends) <= 8, [e.ms for e in extends]
    assert not any(e.exact for e in extends)
