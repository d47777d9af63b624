"""Pure call tracking: AMI events and clock ticks in, metering actions out; no I/O, no clock.

A prepaid call is known by its reference, the ``Uniqueid`` of the authorized caller channel
(``PREPAID_CALLREF``).  The tracker asks for that call's live record (:class:`Lookup`) when
the channel starts a ``Dial`` or sets ``PREPAID_CALLREF``, learns when it is answered
(``DialEnd`` ANSWER or ``BridgeEnter``) and hung up (``Hangup``), and says which block to
pay when (:class:`PayBlock`), when to warn or cut off, and how to settle at the end
(:class:`Finish`).  The I/O layer reports each result back (``attach``, ``paid``,
``refused``, ``failed``, ``finished``), so nothing is done twice and nothing is lost when
Redis or the AMI link is away: whatever is still owed is asked for again on the next tick.

Time comes only from the events' ``Timestamp`` header and from :meth:`Tracker.tick`, in
integer microseconds.  Block ``n`` (n >= 2) is due once the call has been up for more than
``covered_seconds(rate, n - 1)``; the billed duration of a call is its time up rounded up
to whole seconds, so the blocks paid by construction are ``blocks_for(rate, duration)``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from ami_listener.protocol import timestamp_us
from prepaid.rating import Rate, block_cost, blocks_for, covered_seconds

log = logging.getLogger(__name__)

US = 1_000_000
FAILED_DIAL = frozenset({"BUSY", "NOANSWER", "CANCEL", "CONGESTION", "CHANUNAVAIL",
                         "DONTCALL", "TORTURE", "INVALIDARGS"})
DONE_MEMORY = 10_000  # finished references remembered, to ignore their late events


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What the authorization stored about a call (from the live-call record)."""

    account: str
    number: str
    rate: Rate
    hold: int
    channel: str = ""
    answered_us: int | None = None  # when resuming after a restart
    blocks_paid: int = 0


# -- actions ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lookup:
    ref: str


@dataclass(frozen=True, slots=True)
class PayBlock:
    """Pay block ``n``: block 1 settles the hold, later blocks are debits."""

    ref: str
    account: str
    n: int
    amount: int
    answered_us: int


@dataclass(frozen=True, slots=True)
class ReleaseHold:
    ref: str
    account: str


@dataclass(frozen=True, slots=True)
class CheckCredit:
    """Block ``n`` starts in ``warning`` seconds: warn the caller if it can't be paid."""

    ref: str
    account: str
    channel: str
    n: int
    amount: int


@dataclass(frozen=True, slots=True)
class Extend:
    """Paid time now ends ``seconds`` from ``at_us``: move the channel's hard limit."""

    ref: str
    channel: str
    seconds: int
    at_us: int


@dataclass(frozen=True, slots=True)
class Cutoff:
    ref: str
    channel: str
    n: int


@dataclass(frozen=True, slots=True)
class Finish:
    """The call is over: pay blocks up to ``blocks`` (refund any past it) and log it."""

    ref: str
    account: str
    number: str
    rate: Rate
    duration: int  # seconds up, rounded up; 0 if never answered
    blocks: int
    paid: int
    answered_us: int | None
    ended_us: int | None
    cause: str
    source: str  # events | cdr | estimate
    cutoff: int  # block refused for want of credit, 0 if none


Action = Lookup | PayBlock | ReleaseHold | CheckCredit | Extend | Cutoff | Finish


@dataclass(slots=True)
class Call:
    ref: str
    info: CallInfo | None = None
    channel: str = ""
    answered_us: int | None = None
    ended_us: int | None = None
    ended: bool = False
    cause: str = ""
    paid: int = 0
    busy: bool = False  # an action for this call awaits its result
    refused: int = 0
    cutoff_sent: bool = False
    warned: int = 0
    extended: int = 0
    release_wanted: bool = False
    released: bool = False
    cdr_billsec: int | None = None
    confirmed: bool = True  # seen live since the last (re)connect
    trigger: str = ""  # what made us look the call up: dial | varset


@dataclass
class Tracker:
    """All prepaid calls in flight, as one state machine."""

    warning_seconds: int = 60
    now: int = 0  # microseconds, the latest time known
    calls: dict[str, Call] = field(default_factory=dict)
    negative: dict[str, str] = field(default_factory=dict)  # uid -> what triggered the lookup
    done: OrderedDict[str, None] = field(default_factory=OrderedDict)
    listing: bool = False
    oddities: int = 0
    wake: int = 0  # nothing falls due before this time (us): ticks before it are cheap

    # -- input: events ----------------------------------------------------------------
    def feed(self, msg: Mapping[str, str]) -> list[Action]:
        """One AMI event; returns what to do now (blocks that fell due first)."""
        out: list[Action] = []
        stamp = msg.get("Timestamp")
        at = timestamp_us(stamp) if stamp else None
        if at is not None and at > self.now:
            out += self.tick(at)
        when = at if at is not None else self.now
        event = msg.get("Event", "")
        uid = msg.get("Uniqueid", "")
        if event == "VarSet":
            if msg.get("Variable") == "PREPAID_CALLREF" and uid and msg.get("Value") == uid:
                out += self._want(uid, "varset", msg.get("Channel", ""))
            return out
        if event == "DialBegin" and uid:
            out += self._want(uid, "dial", msg.get("Channel", ""))
        elif event == "CoreShowChannel" and uid:
            out += self._listed(uid, msg)
            return out
        elif event == "CoreShowChannelsComplete":
            return out + self._listing_done()
        elif event == "Cdr":
            uid = msg.get("UniqueID", "")
        call = self.calls.get(uid)
        if call is None:
            if event == "Hangup":
                self.negative.pop(uid, None)
            return out
        if event != "Cdr":  # a CDR is posted as the channel goes: no sign it is still up
            call.confirmed = True
        if event == "DialEnd":
            status = msg.get("DialStatus", "")
            if status == "ANSWER":
                self._answer(call, when)
            elif status in FAILED_DIAL and call.answered_us is None:
                call.release_wanted = True
        elif event == "BridgeEnter":
            self._answer(call, when)
        elif event == "Hangup":
            if call.ended:
                self._odd("duplicate Hangup for %s", call.ref)
            else:
                call.ended, call.ended_us = True, when
                call.cause = msg.get("Cause-txt", "") or msg.get("Cause", "")
        elif event == "Rename":
            call.channel = msg.get("Newname", call.channel)
        elif event == "Cdr":
            billsec = msg.get("BillableSeconds", "")
            if billsec.isdigit():
                call.cdr_billsec = int(billsec)
        out += self._advance(call)
        return out

    def _want(self, uid: str, trigger: str, channel: str) -> list[Action]:
        if uid in self.calls or uid in self.done:
            return []
        if uid in self.negative and not (trigger == "dial" and self.negative[uid] == "varset"):
            return []
        call = Call(uid, channel=channel, busy=True, trigger=trigger)
        self.calls[uid] = call
        self.negative.pop(uid, None)
        return [Lookup(uid)]

    def _answer(self, call: Call, when: int) -> None:
        if call.answered_us is not None:
            return
        if call.ended:
            self._odd("answer after hangup for %s ignored", call.ref)
            return
        call.answered_us = when

    def _odd(self, text: str, *args: object) -> None:
        self.oddities += 1
        log.debug(text, *args)

    # -- input: time ----------------------------------------------------------------
    def tick(self, now: int) -> list[Action]:
        """The clock moved on to ``now`` (microseconds); never goes back."""
        if now > self.now:
            self.now = now
        if self.now < self.wake:
            return []
        self.wake = 1 << 62
        out: list[Action] = []
        for call in list(self.calls.values()):
            out += self._advance(call)
        return out

    # -- input: results from the I/O layer --------------------------------------------
    def attach(self, ref: str, info: CallInfo, *, resumed: bool = False) -> list[Action]:
        """The call's record was found: start (or resume after a restart) metering it."""
        call = self.calls.get(ref)
        if call is None:
            if ref in self.done:
                return []
            call = self.calls[ref] = Call(ref, channel=info.channel)
            if resumed and self.listing:
                call.confirmed = False  # until the channel list shows it is still up
        call.info = info
        call.busy = False
        call.channel = call.channel or info.channel
        if info.answered_us is not None and call.answered_us is None:
            call.answered_us = info.answered_us
        call.paid = max(call.paid, info.blocks_paid)
        return self._advance(call)

    def not_prepaid(self, ref: str) -> None:
        call = self.calls.pop(ref, None)
        if call is not None and not call.ended:
            self.negative[ref] = call.trigger

    def paid(self, ref: str, n: int) -> list[Action]:
        call = self.calls.get(ref)
        if call is None:
            return []
        call.busy = False
        call.paid = max(call.paid, n)
        return self._advance(call)

    def refused(self, ref: str, n: int) -> list[Action]:
        call = self.calls.get(ref)
        if call is None:
            return []
        call.busy = False
        call.refused = n
        return self._advance(call)

    def released(self, ref: str) -> None:
        call = self.calls.get(ref)
        if call is not None:
            call.busy, call.released = False, True

    def failed(self, ref: str) -> None:
        """The last action could not be done (Redis away): it is asked for again on tick."""
        call = self.calls.get(ref)
        if call is not None:
            call.busy = False
            self.wake = 0

    def lookup_failed(self, ref: str) -> None:
        call = self.calls.get(ref)
        if call is not None:
            call.busy = False
            self.wake = 0

    def finished(self, ref: str) -> None:
        self.calls.pop(ref, None)
        self.negative.pop(ref, None)
        self.done[ref] = None
        while len(self.done) > DONE_MEMORY:
            self.done.popitem(last=False)

    # -- recovery: which calls are still up -----------------------------------------
    def begin_listing(self) -> None:
        """A (re)connect: every call must be seen again in the channel list or it ended."""
        self.listing = True
        for call in self.calls.values():
            call.confirmed = False

    def _listed(self, uid: str, msg: Mapping[str, str]) -> list[Action]:
        call = self.calls.get(uid)
        if call is None:
            return []
        call.confirmed = True
        call.channel = msg.get("Channel", call.channel) or call.channel
        if call.answered_us is None and msg.get("BridgeId"):
            # Answered while we were away; the exact time is lost, bill from now.
            self._odd("call %s was answered while the listener was away", uid)
            call.answered_us = self.now
        return self._advance(call)

    def _listing_done(self) -> list[Action]:
        if not self.listing:
            return []
        self.listing = False
        out: list[Action] = []
        for call in list(self.calls.values()):
            if not call.confirmed and not call.ended and call.info is not None:
                self._odd("call %s ended while the listener was away", call.ref)
                call.ended, call.ended_us, call.cause = True, None, "ended while away"
            call.confirmed = True
            out += self._advance(call)
        return out

    # -- the decisions ----------------------------------------------------------------
    def due_us(self, call: Call, n: int) -> int:
        assert call.info is not None and call.answered_us is not None
        return call.answered_us + covered_seconds(call.info.rate, n - 1) * US

    def _advance(self, call: Call) -> list[Action]:
        info = call.info
        if info is None or call.busy or (self.listing and not call.confirmed):
            return []
        if call.ended:
            call.busy = True
            return [self._finish(call, info)]
        if call.answered_us is None:
            if call.release_wanted and not call.released:
                call.busy = True
                return [ReleaseHold(call.ref, info.account)]
            return []
        if call.refused:
            if call.cutoff_sent:
                return []
            call.cutoff_sent = True
            return [Cutoff(call.ref, call.channel, call.refused)]
        out: list[Action] = []
        if call.extended < call.paid:
            call.extended = call.paid
            end = self.due_us(call, call.paid + 1)
            seconds = max(1, -(-(end - self.now) // US))
            out.append(Extend(call.ref, call.channel, seconds, self.now))
        n = call.paid + 1
        due = self.due_us(call, n)
        if n == 1 or self.now > due:
            call.busy = True
            out.append(PayBlock(call.ref, info.account, n, block_cost(info.rate, n),
                                call.answered_us))
        else:
            self.wake = min(self.wake, due + 1)
            warn_at = due - self.warning_seconds * US
            if self.warning_seconds > 0 and call.warned < n:
                if self.now >= warn_at:
                    call.warned = n
                    out.append(CheckCredit(call.ref, info.account, call.channel, n,
                                           block_cost(info.rate, n)))
                else:
                    self.wake = min(self.wake, warn_at)
        return out

    def _finish(self, call: Call, info: CallInfo) -> Finish:
        rate = info.rate
        source = "events"
        if call.answered_us is None:
            duration = 0
        elif call.ended_us is not None:
            # Whole seconds, truncated as Asterisk's own billsec is: the call is charged
            # what the CDR says, and a block paid at its start but never completed is
            # given back at settlement.
            duration = max(0, (call.ended_us - call.answered_us) // US)
        else:
            # Ended while we were away: the CDR's billable seconds, else the time paid for.
            lower = covered_seconds(rate, call.paid - 1) if call.paid else 0
            if call.cdr_billsec is not None:
                source, duration = "cdr", max(call.cdr_billsec, lower)
            else:
                source = "estimate"
                duration = covered_seconds(rate, call.paid) if call.paid else 1
        blocks = blocks_for(rate, duration)
        if call.refused and blocks > call.refused:
            blocks = call.refused
            duration = min(duration, covered_seconds(rate, call.refused))
        return Finish(call.ref, info.account, info.number, rate, duration, blocks, call.paid,
                      call.answered_us, call.ended_us, call.cause, source, call.refused)
