"""Recorded real Asterisk 22 traffic through the meter (the file runner), on a real Redis."""

from __future__ import annotations

from pathlib import Path

import pytest

from ami_listener.meter import Meter, calls_key
from ami_listener.runners import replay
from ami_listener.tracker import US
from prepaid.callrecord import record_key
from prepaid.ledger import Ledger
from prepaid.rating import Rate, block_cost, cost
from testbed.ami_peer import (
    FIXTURES,
    PER_SECOND,
    RECORDINGS,
    Sent,
    authorize,
    load,
    open_account,
    recording_meter,
)
from testbed.replies import entries

SHARED = FIXTURES / "shared"

START = 10_000_000  # 10.00


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.parent.name + "/" + p.stem)
async def test_recording_bills_exactly_the_rate_of_its_duration(ledger: Ledger,
                                                                path: Path) -> None:
    rec = load(path)
    await open_account(ledger, START)
    await authorize(ledger, rec.ref, rec.channel, rec.number, PER_SECOND)
    meter = Meter(ledger)
    await replay(meter, rec.messages)

    account = await ledger.get("alice")
    answer, hangup = rec.times()
    if hangup is None:  # the recording stops while the call still rings
        assert account.balance == START and account.held == block_cost(PER_SECOND, 1)
        assert rec.ref in meter.tracker.calls
        return
    seconds = rec.billed_duration()
    assert account.balance == START - cost(PER_SECOND, seconds)
    assert account.held == 0 and await ledger.holds("alice") == {}
    rows = entries(await ledger.redis.xrange(calls_key(ledger, "alice")))
    assert len(rows) == 1
    logged = rows[0][1]
    assert logged["ref"] == rec.ref and logged["number"] == rec.number
    assert int(logged["cost"]) == cost(PER_SECOND, seconds)
    assert int(logged["duration"]) == seconds
    assert logged["rate"] == "per second" and logged["prefix"] == "39"
    if rec.answered:
        assert answer is not None and seconds > 0
        assert logged["answered"] == f"{answer / US:.6f}"
    else:
        assert seconds == 0 and logged["answered"] == ""
    state = await ledger.redis.hget(record_key("prepaid", rec.ref), "state")
    assert state == b"ended"


async def test_answered_caller_hangs_up_to_the_micro_unit(ledger: Ledger) -> None:
    rec = load(SHARED / "answered-caller-hangs-up.ami")
    await open_account(ledger, START)
    await authorize(ledger, rec.ref, rec.channel, rec.number, PER_SECOND)
    await replay(Meter(ledger), rec.messages)
    # Answered 02:42:11.157716, caller hung up 4.005205 s later: 4 s billed, as the Cdr's
    # BillableSeconds says. 0.05 connect + 4 x 0.01 = 0.09.
    assert (await ledger.get("alice")).balance == START - 90_000
    history = await ledger.history("alice", 30)
    kinds = [e.kind for e in history if e.ref == f"call {rec.ref}"]
    # Block 1 settles the hold; blocks 2-7 are paid 2 s ahead of their start, and the three
    # the call never reached (5-7) are given back once.
    assert sorted(kinds) == ["debit"] * 6 + ["reserve", "settle"]
    refunds = [e for e in history if e.ref.startswith(f"call {rec.ref} block")]
    assert sorted(e.ref.split()[3] for e in refunds) == ["5", "6", "7"]


async def test_replaying_twice_charges_once(ledger: Ledger) -> None:
    rec = load(SHARED / "answered-callee-hangs-up.ami")
    await open_account(ledger, START)
    await authorize(ledger, rec.ref, rec.channel, rec.number, PER_SECOND)
    await replay(Meter(ledger), rec.messages)
    after_first = (await ledger.get("alice")).balance
    await replay(Meter(ledger), rec.messages)  # a second listener, same traffic
    assert (await ledger.get("alice")).balance == after_first == START - cost(PER_SECOND, 3)
    assert len(entries(await ledger.redis.xrange(calls_key(ledger, "alice")))) == 1


async def test_calls_without_a_record_are_not_billed(ledger: Ledger) -> None:
    await open_account(ledger, START)
    meter = Meter(ledger)
    for path in RECORDINGS:
        await replay(meter, load(path).messages)
    assert (await ledger.get("alice")).balance == START
    assert meter.tracker.calls == {} and meter.errors == 0


async def test_cut_off_when_the_next_block_cannot_be_paid(ledger: Ledger) -> None:
    rec = load(SHARED / "answered-caller-hangs-up.ami")
    # Enough for block 1 and 2 (0.06 + 0.01); block 3 starts after 2 s.
    await open_account(ledger, 70_000)
    await authorize(ledger, rec.ref, rec.channel, rec.number, PER_SECOND)
    sent = Sent()
    meter, recorder = recording_meter(ledger, commands=sent)
    await replay(meter, rec.messages)
    # Block 3 is refused ahead of its start: the hard limit becomes the paid 2 s (+0.5 s, as
    # billsec truncates), and a hang-up backs it up once the call outlives it.
    exact = [h for h in sent.named("Setvar") if float(h["Value"]) < 15]
    assert [h["Channel"] for h in exact] == [rec.channel]
    assert sent.named("Hangup") == [{"Channel": rec.channel, "Cause": "16"}]
    account = await ledger.get("alice")
    # Nobody applied the limit in this recording: the caller stayed up 4 s, the CDR says so,
    # and the CDR is what is owed, below zero.
    assert account.balance == 70_000 - cost(PER_SECOND, 4)
    assert account.held == 0
    [logged] = recorder.settlements
    assert logged.cutoff == 3 and logged.blocks == 4 and logged.cost == cost(PER_SECOND, 4)
    assert meter.tracker.overdrawn == 2


async def test_top_up_during_the_call_lets_it_go_on(ledger: Ledger) -> None:
    rec = load(SHARED / "answered-caller-hangs-up.ami")
    await open_account(ledger, 70_000)
    await authorize(ledger, rec.ref, rec.channel, rec.number, PER_SECOND)
    sent = Sent()
    meter = Meter(ledger, commands=sent)
    answer_index = next(i for i, m in enumerate(rec.messages)
                        if m.get("Event") == "BridgeEnter" and m.get("Uniqueid") == rec.ref)
    await replay(meter, rec.messages[:answer_index + 1])
    await ledger.credit("alice", 5_000_000, key="topup-1", ref="top-up during the call")
    await replay(meter, rec.messages[answer_index + 1:])
    assert sent.named("Hangup") == []
    assert (await ledger.get("alice")).balance == 5_070_000 - cost(PER_SECOND, 4)
    # The channel's hard limit (the safety net) is set the grace past the paid time at the
    # first block, moved to the paid time itself once block 3 was refused, and back to the
    # grace after the top-up; the 4 s call's other paid blocks (7 in all, 2 s ahead) leave
    # it alone, its grace never below two thirds.
    limits = sent.named("Setvar")
    assert {h["Variable"] for h in limits} == {"TIMEOUT(absolute)"}
    values = [float(h["Value"]) for h in limits]
    assert len(values) == 3 and values[0] > 20 and values[1] < 15 and values[2] > 20


@pytest.mark.parametrize(("context", "foreseen_seconds", "whispered"), [
    ("prepaid-warning", 3600, True),  # opted in, the credit ends before the foreseen 3600 s
    ("prepaid-warning", 2, False),  # where the authorization foresaw: Dial's L() warns
    ("", 3600, False),  # the default: no Originate, the AMI user needs no such right
])
async def test_warning_when_another_call_spent_the_credit(
        ledger: Ledger, context: str, foreseen_seconds: int, whispered: bool) -> None:
    rec = load(SHARED / "answered-caller-hangs-up.ami")
    slow = Rate("39", "per minute", per_minute=600_000, connect_fee=0, initial=2,
                increment=2)
    await open_account(ledger, 2 * block_cost(slow, 1))
    await authorize(ledger, rec.ref, rec.channel, rec.number, slow,
                    max_seconds=foreseen_seconds)
    sent = Sent()
    meter = Meter(ledger, commands=sent, warning_seconds=1, warning_context=context)
    meter.tracker.pay_ahead_us = 0  # so the other call can spend block 2's credit first
    answer_index = next(i for i, m in enumerate(rec.messages)
                        if m.get("Event") == "BridgeEnter" and m.get("Uniqueid") == rec.ref)
    await replay(meter, rec.messages[:answer_index + 1])
    await ledger.debit("alice", block_cost(slow, 1), key="other-call", ref="another call")
    answered = rec.times()[0]
    assert answered is not None
    await meter.tick(answered + 1_500_000)  # block 2 starts in 0.5 s and can't be paid
    originate = sent.named("Originate")
    if not whispered:
        assert originate == []
        return
    assert len(originate) == 1 and originate[0]["Data"] == f"{rec.channel},qwE"
    assert originate[0]["Channel"] == "Local/s@prepaid-warning/n"
    assert "credit-expires-in-one-minute" in originate[0]["Variable"]


async def test_a_free_destination_is_metered_and_bills_zero(ledger: Ledger) -> None:
    # A freephone row priced 0: the AGI's hold is 0 (the ledger takes it), the call is
    # metered to its end and costs nothing.
    free = Rate("39", "freephone", per_minute=0, connect_fee=0, initial=1, increment=1)
    rec = load(SHARED / "answered-caller-hangs-up.ami")
    await open_account(ledger, START)
    await authorize(ledger, rec.ref, rec.channel, rec.number, free)
    assert await ledger.holds("alice") == {f"call:{rec.ref}": 0}
    meter, recorder = recording_meter(ledger)
    await replay(meter, rec.messages)
    account = await ledger.get("alice")
    assert (account.balance, account.held) == (START, 0)
    assert await ledger.holds("alice") == {} and meter.errors == 0
    [settled] = recorder.settlements
    assert settled.cost == 0
