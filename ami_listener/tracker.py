"""Pure call tracking: AMI events and clock ticks in, metering actions out; no I/O, no clock.

A prepaid call is known by its reference, the ``Uniqueid`` of the authorized caller channel
(``PREPAID_CALLREF``).  The tracker asks for that call's live record (:class:`Lookup`) when
the channel starts a ``Dial`` or sets ``PREPAID_CALLREF``, learns when it is answered
(``DialEnd`` ANSWER or ``BridgeEnter``) and hung up (``Hangup``), and says which block to
pay when (:class:`PayBlock`), when to warn or cut off, and how to settle at the end:
which blocks to charge, refund or release (:class:`Finish`), then what the call cost
(:class:`Report` of a :class:`Settlement`).  The I/O layer only carries the actions out
and reports each result back (``attach``, ``paid``, ``refused``, ``past_credit``,
``charged``, ``failed``, ``finished``), so nothing is done twice and nothing is lost when
Redis or the AMI link is away: whatever is still owed is asked for again on the next tick.

Time comes from the events (their ``Timestamp`` header with ``timestampevents = yes``, else
the time the runner read them) and from :meth:`Tracker.tick`, in integer microseconds.
Block ``n`` (n >= 2) starts once the call has been up ``covered_seconds(rate, n - 1)``; it is
paid ``pay_ahead`` before that, so a refusal is known in time for Asterisk itself to end the
call where the paid time ends (``TIMEOUT(absolute)``, an exact :class:`Extend`).  While
blocks are paid the hard limit runs ``grace`` past the paid time, so a listener restart
shorter than that drops no call.

What a call costs is decided by Asterisk's own CDR: its billable seconds (``Cdr`` event, or
the CDR file for a call that ended while the listener was away) are the billed duration,
and the blocks are put right at settlement.  Only without any CDR is the duration taken
from the events (whole seconds, truncated as Asterisk's billsec is).
"""

from __future__ import annotations

import heapq
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ami_listener.protocol import timestamp_us
from prepaid.rating import (
    Rate,
    billed_seconds,
    block_cost,
    blocks_for,
    cost,
    cost_of_billed,
    covered_seconds,
    rate_json,
)

log = logging.getLogger(__name__)

US = 1_000_000
FAILED_DIAL = frozenset({"BUSY", "NOANSWER", "CANCEL", "CONGESTION", "CHANUNAVAIL",
                         "DONTCALL", "TORTURE", "INVALIDARGS"})
DONE_MEMORY = 10_000  # finished references remembered, to ignore their late events
PAY_AHEAD_US = 2 * US  # a block is paid this long before it starts
CDR_WAIT_US = 3 * US  # the Cdr event usually comes with the Hangup; wait at most this long
CDR_NEAR_US = US  # a Cdr this close to the Hangup is the channel's last
CDR_IDENTITY = ("StartTime", "AnswerTime", "EndTime", "Channel", "DestinationChannel",
                "LastApplication", "BillableSeconds")
CDR_LOOKS = 3  # CDR file look-ups (a second apart) before billing from the events
RETRY_BEFORE_US = US // 2  # a refused block is asked for once more this long before it starts
CUT_MARGIN_US = US // 2  # an exact limit lands this far past the paid seconds (CDR truncates)
BACKSTOP_US = 2 * US  # after this, a call past its paid time is hung up over AMI as well


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
    cdr_billsec: int | None = None  # CDRs already posted for it (a transfer's first leg)
    max_seconds: int = 0  # the paid time the authorization foresaw (Dial's L() warns by it)
    plan: str = ""  # the plan whose deck gave the rate


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
    """Block ``n`` starts in ``warning`` seconds: warn the caller if it can't be paid.
    ``foreseen``: the authorization's paid time ends where block ``n`` starts, so the
    dialplan's own warning (Dial's L()) is playing now."""

    ref: str
    account: str
    channel: str
    n: int
    amount: int
    foreseen: bool = False


@dataclass(frozen=True, slots=True)
class Extend:
    """Move the channel's hard limit (``TIMEOUT(absolute)``) to ``ms`` from now: the paid
    time plus the grace while blocks are paid, the paid time alone (``exact``) once the
    next block was refused."""

    ref: str
    channel: str
    ms: int
    exact: bool


@dataclass(frozen=True, slots=True)
class NoteCdr:
    """A CDR came while the call goes on (a transfer): keep its seconds with the call's
    record, so a listener that takes over after a restart still adds them up."""

    ref: str
    billsec: int


@dataclass(frozen=True, slots=True)
class FindCdr:
    """Look the call's CDR up where it survives the listener's absence (the CDR file)."""

    ref: str


@dataclass(frozen=True, slots=True)
class Cutoff:
    ref: str
    channel: str
    n: int


@dataclass(frozen=True, slots=True)
class Block:
    n: int
    amount: int


@dataclass(frozen=True, slots=True)
class Finish:
    """The call is over: settle it on the ledger, then report back (:meth:`Tracker.charged`).

    ``charges`` are the blocks past the paid ones that the call reached: owed all the
    same, so a block the credit no longer covers is charged past it (only a call that
    outlived its paid time while the listener was away can do that: at most ``[ami]
    grace_seconds`` of it) and reported (:meth:`Tracker.past_credit`).  ``refunds`` are
    the blocks paid ahead for time the call never reached; ``release`` ends the hold of
    a call that reached no block."""

    ref: str
    account: str
    number: str
    rate: Rate
    duration: int  # billed seconds: the CDR's billsec, else seconds up (truncated)
    blocks: int
    paid: int
    answered_us: int | None
    ended_us: int | None
    cause: str
    source: str  # cdr | events | estimate
    cutoff: int  # block refused for want of credit, 0 if none
    charges: tuple[Block, ...] = ()
    refunds: tuple[Block, ...] = ()
    release: bool = False
    plan: str = ""


@dataclass(frozen=True, slots=True)
class Settlement:
    """What a finished call cost, as written to the account's call history."""

    ref: str
    account: str
    number: str
    prefix: str
    rate_name: str
    answered: float | None
    ended: float | None
    duration: int
    billed: int
    cost: int
    blocks: int
    cause: str
    source: str
    cutoff: int
    # The rate the call was billed at (JSON of the Rate), so `prepaid verify` can check
    # the cost against it after the deck has changed.
    tariff: str = ""
    plan: str = ""  # the account's plan when the call was authorized

    def fields(self) -> dict[str, str]:
        return {"ref": self.ref, "account": self.account, "number": self.number,
                "prefix": self.prefix, "rate": self.rate_name,
                "answered": "" if self.answered is None else f"{self.answered:.6f}",
                "ended": "" if self.ended is None else f"{self.ended:.6f}",
                "duration": str(self.duration), "billed": str(self.billed),
                "cost": str(self.cost), "blocks": str(self.blocks), "cause": self.cause,
                "source": self.source, "cutoff": str(self.cutoff), "tariff": self.tariff,
                "plan": self.plan}


@dataclass(frozen=True, slots=True)
class Report:
    """The ledger is settled: hand the call's settlement to the reporter, then it is
    finished (:meth:`Tracker.finished`)."""

    ref: str
    settlement: Settlement


Action = (Lookup | PayBlock | ReleaseHold | CheckCredit | Extend | Cutoff | NoteCdr | FindCdr
          | Finish | Report)


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
    refused: int = 0  # the block that could not be paid (0: none)
    retried: bool = False  # that block was asked for once more, just before it starts
    cutoff_sent: bool = False
    warned: int = 0
    limit: tuple[int, bool] = (0, False)  # (blocks paid, exact) when the limit was last set
    limit_at: int = 0  # the limit then set (us)
    release_wanted: bool = False
    released: bool = False
    cdr_billsec: int | None = None  # the sum of the channel's CDRs so far
    cdr_at: int | None = None  # when the last one came
    cdr_seen: set[str] = field(default_factory=set)
    cdr_final: bool = False  # the last of them is in
    cdr_wait_until: int | None = None  # after the Hangup, wait this long for the Cdr event
    cdr_looked: int = 0  # CDR file look-ups done
    confirmed: bool = True  # seen live since the last (re)connect
    trigger: str = ""  # what made us look the call up: dial | varset
    finish: Finish | None = None  # the settlement under way
    past_credit: list[int] = field(default_factory=list)  # blocks charged past the credit
    settlement: Settlement | None = None  # the ledger is settled; to be reported


@dataclass
class Tracker:
    """All prepaid calls in flight, as one state machine."""

    warning_seconds: int = 60
    grace_seconds: int = 30
    pay_ahead_us: int = PAY_AHEAD_US
    cdr_wait_us: int = CDR_WAIT_US
    now: int = 0  # microseconds, the latest time known
    calls: dict[str, Call] = field(default_factory=dict)
    negative: dict[str, str] = field(default_factory=dict)  # uid -> what triggered the lookup
    done: OrderedDict[str, None] = field(default_factory=OrderedDict)
    listing: bool = False
    oddities: int = 0
    overdrawn: int = 0  # blocks a CDR reached that the credit no longer covered
    wake: int = 0  # nothing falls due before this time (us): ticks before it are cheap
    # When each call next falls due (time, ref), earliest first: a tick advances those calls
    # only, not every live call. Stale entries just advance a call early, which is a no-op.
    due: list[tuple[int, str]] = field(default_factory=list)
    everyone: bool = True  # the next tick advances every call (after a failure)

    # -- input: events ----------------------------------------------------------------
    def feed(self, msg: Mapping[str, str], received_us: int | None = None) -> list[Action]:
        """One AMI event, read at ``received_us`` (used when it carries no Timestamp);
        returns what to do now (blocks that fell due first)."""
        out: list[Action] = []
        stamp = msg.get("Timestamp")
        at = timestamp_us(stamp) if stamp else None
        if at is None:
            at = received_us
        event = msg.get("Event", "")
        if event == "Cdr":
            # Before time moves on to it: a call waiting for its CDR must not give up on
            # the tick that this very event brings.
            cdr_call = self.calls.get(msg.get("UniqueID", ""))
            if cdr_call is not None:
                self._cdr(cdr_call, msg, at if at is not None else self.now, out)
        if at is not None and at > self.now:
            out += self.tick(at)
        when = at if at is not None else self.now
        out += ON_EVENT.get(event, Tracker._on_channel_event)(self, msg, when)
        return out

    def _on_varset(self, msg: Mapping[str, str], when: int) -> list[Action]:
        uid = msg.get("Uniqueid", "")
        if msg.get("Variable") == "PREPAID_CALLREF" and uid and msg.get("Value") == uid:
            return self._want(uid, "varset", msg.get("Channel", ""))
        return []

    def _on_dial_begin(self, msg: Mapping[str, str], when: int) -> list[Action]:
        uid = msg.get("Uniqueid", "")
        out = self._want(uid, "dial", msg.get("Channel", "")) if uid else []
        return out + self._on_channel_event(msg, when)

    def _on_listed(self, msg: Mapping[str, str], when: int) -> list[Action]:
        return self._listed(msg.get("Uniqueid", ""), msg)

    def _on_listing_done(self, msg: Mapping[str, str], when: int) -> list[Action]:
        return self._listing_done()

    def _on_cdr(self, msg: Mapping[str, str], when: int) -> list[Action]:
        # Taken in before the tick (see feed); a CDR is posted as the channel goes, so it
        # is no sign that the call is still up.
        call = self.calls.get(msg.get("UniqueID", ""))
        return [] if call is None else self._advance(call)

    def _on_channel_event(self, msg: Mapping[str, str], when: int) -> list[Action]:
        """Any other event of a call's channel: it is still up (or just hung up)."""
        uid = msg.get("Uniqueid", "")
        call = self.calls.get(uid)
        if call is None:
            if msg.get("Event") == "Hangup":
                self.negative.pop(uid, None)
            return []
        call.confirmed = True
        change = ON_CALL_EVENT.get(msg.get("Event", ""))
        if change is not None:
            change(self, call, msg, when)
        return self._advance(call)

    def _on_dial_end(self, call: Call, msg: Mapping[str, str], when: int) -> None:
        status = msg.get("DialStatus", "")
        if status == "ANSWER":
            self._answer(call, when)
        elif status in FAILED_DIAL and call.answered_us is None:
            call.release_wanted = True

    def _on_bridge_enter(self, call: Call, msg: Mapping[str, str], when: int) -> None:
        self._answer(call, when)

    def _on_hangup(self, call: Call, msg: Mapping[str, str], when: int) -> None:
        if call.ended:
            self._odd("duplicate Hangup for %s", call.ref)
            return
        call.ended, call.ended_us = True, when
        call.cause = msg.get("Cause-txt", "") or msg.get("Cause", "")
        # Asterisk posts a channel's last CDR as it hangs up, just before or after the
        # Hangup; one from well before is a transfer's, and more are to come.
        if call.cdr_at is not None and when - call.cdr_at <= CDR_NEAR_US:
            call.cdr_final = True

    def _on_rename(self, call: Call, msg: Mapping[str, str], when: int) -> None:
        call.channel = msg.get("Newname", call.channel)

    def _cdr(self, call: Call, msg: Mapping[str, str], when: int, out: list[Action]) -> None:
        billsec = msg.get("BillableSeconds", "")
        # The same CDR twice (a stream read twice) must not count twice.
        sig = "|".join(msg.get(k, "") for k in CDR_IDENTITY)
        if billsec.isdigit() and sig not in call.cdr_seen:
            call.cdr_seen.add(sig)
            # A channel's CDRs (one per transfer leg) share out its time: add them up.
            call.cdr_billsec = (call.cdr_billsec or 0) + int(billsec)
            call.cdr_at = when
            call.cdr_final = call.ended
            if not call.ended and call.answered_us is not None:
                out.append(NoteCdr(call.ref, call.cdr_billsec))

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
        out: list[Action] = []
        if self.everyone:
            self.everyone, self.due, self.wake = False, [], 1 << 62
            for call in list(self.calls.values()):
                out += self._advance(call)
            return out
        refs: dict[str, None] = {}
        while self.due and self.due[0][0] <= self.now:
            refs[heapq.heappop(self.due)[1]] = None
        self.wake = self.due[0][0] if self.due else 1 << 62
        for ref in refs:
            found = self.calls.get(ref)
            if found is not None:
                out += self._advance(found)
        return out

    def _wake_at(self, call: Call, at: int) -> None:
        heapq.heappush(self.due, (at, call.ref))
        self.wake = min(self.wake, at)

    def _wake_everyone(self) -> None:
        self.everyone, self.wake = True, 0

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
        if info.cdr_billsec is not None and call.cdr_billsec is None:
            call.cdr_billsec = info.cdr_billsec
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
        if call.refused and call.paid >= call.refused:  # paid on the retry: a top-up came
            call.refused, call.retried = 0, False
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
            self._wake_everyone()

    def cdr_found(self, ref: str, billsec: int | None, *, again: bool = True) -> list[Action]:
        """The CDR file's billable seconds for the call, or None when it holds no line;
        ``again=False`` when there is no file to look in again."""
        call = self.calls.get(ref)
        if call is None:
            return []
        call.busy = False
        call.cdr_looked = call.cdr_looked + 1 if again else CDR_LOOKS
        if billsec is not None:
            call.cdr_billsec, call.cdr_final = billsec, True
        elif call.cdr_looked < CDR_LOOKS:
            call.cdr_wait_until = self.now + US  # Asterisk may not have written it yet
        return self._advance(call)

    def past_credit(self, ref: str, n: int) -> None:
        """Block ``n`` of a finishing call was charged past the credit."""
        call = self.calls.get(ref)
        if call is not None and n not in call.past_credit:
            call.past_credit.append(n)
            self.overdrawn += 1

    def charged(self, ref: str) -> list[Action]:
        """The ledger carried out the call's :class:`Finish`: report its settlement."""
        call = self.calls.get(ref)
        if call is None or call.finish is None:
            return []
        call.settlement = _settlement(call.finish, call.past_credit)
        return [Report(ref, call.settlement)]  # busy still: the report is this action's end

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
            return self._ending(call, info)
        if call.answered_us is None:
            if call.release_wanted and not call.released:
                call.busy = True
                return [ReleaseHold(call.ref, info.account)]
            return []
        out: list[Action] = []
        n = call.paid + 1
        due = self.due_us(call, n)
        exact = call.refused == n
        if call.paid and self._limit_stale(call, due, exact):
            call.limit = (call.paid, exact)
            limit = due + CUT_MARGIN_US + (0 if exact else self.grace_seconds * US)
            call.limit_at = limit
            out.append(Extend(call.ref, call.channel, max(1, (limit - self.now) // 1000), exact))
        if exact:
            return out + self._refused_next(call, info, n, due)
        return out + self._next_block(call, info, n, due)

    def _limit_stale(self, call: Call, due: int, exact: bool) -> bool:
        """Whether Asterisk's hard limit must move: at once when it becomes (or stops being)
        the paid time itself; while blocks are paid, once the grace it keeps past the paid
        time has shrunk below two thirds, not at every block (one AMI action a second per
        call on a per-second deck)."""
        if call.limit == (call.paid, exact):
            return False
        if exact or call.limit[1] or not call.limit[0]:
            return True
        return call.limit_at - due < self.grace_seconds * US * 2 // 3

    def _refused_next(self, call: Call, info: CallInfo, n: int, due: int) -> list[Action]:
        """Block ``n`` was refused: Asterisk ends the call where its paid time ends; ask
        once more just before (a top-up may have come), and hang up over AMI should the
        limit not hold."""
        assert call.answered_us is not None
        if not call.retried and self.now >= due - RETRY_BEFORE_US:
            call.retried, call.busy = True, True
            return [PayBlock(call.ref, info.account, n, block_cost(info.rate, n),
                             call.answered_us)]
        if self.now >= due + BACKSTOP_US and not call.cutoff_sent:
            call.cutoff_sent = True
            return [Cutoff(call.ref, call.channel, n)]
        self._wake_at(call, due - RETRY_BEFORE_US if not call.retried else due + BACKSTOP_US)
        return []

    def _next_block(self, call: Call, info: CallInfo, n: int, due: int) -> list[Action]:
        """Pay block ``n`` once it is near, and warn ahead of it."""
        assert call.answered_us is not None
        if n == 1 or self.now >= due - self.pay_ahead_us:
            call.busy = True
            return [PayBlock(call.ref, info.account, n, block_cost(info.rate, n),
                             call.answered_us)]
        self._wake_at(call, due - self.pay_ahead_us)
        warn_at = due - self.warning_seconds * US
        if self.warning_seconds > 0 and call.warned < n:
            if self.now >= warn_at:
                call.warned = n
                return [CheckCredit(call.ref, info.account, call.channel, n,
                                    block_cost(info.rate, n),
                                    covered_seconds(info.rate, n - 1) == info.max_seconds)]
            self._wake_at(call, warn_at)
        return []

    def _ending(self, call: Call, info: CallInfo) -> list[Action]:
        """An ended call: wait for its CDR (the event, else the file), then settle."""
        if call.settlement is not None:
            call.busy = True
            return [Report(call.ref, call.settlement)]
        if not call.cdr_final and call.cdr_looked < CDR_LOOKS and (
                call.answered_us is not None or call.ended_us is None):
            if call.cdr_wait_until is None:
                if not self.now:  # no time known yet (a fresh listener): wait from then
                    self._wake_everyone()
                    return []
                # Seen hanging up: the Cdr event is on its way. Ended while we were away: it
                # may still come (posted as we reconnected), else the file tells.
                call.cdr_wait_until = self.now + self.cdr_wait_us
            if self.now < call.cdr_wait_until:
                self._wake_at(call, call.cdr_wait_until)
                return []
            call.busy = True
            return [FindCdr(call.ref)]
        call.busy = True
        call.finish = self._finish(call, info)
        return [call.finish]

    def _finish(self, call: Call, info: CallInfo) -> Finish:
        rate = info.rate
        source = "events"
        if call.cdr_billsec is not None and (call.cdr_final or call.ended_us is None):
            # Asterisk's own billable seconds: the CDR wins over our clock. (Ended while we
            # were away and not in the CDR file: the Cdr events that did reach us.)
            source, duration = "cdr", call.cdr_billsec
        elif call.answered_us is None:
            duration = 0
        elif call.ended_us is not None:
            # Whole seconds, truncated as Asterisk's own billsec is.
            duration = max(0, (call.ended_us - call.answered_us) // US)
        else:
            # Ended while we were away and no CDR found: the time paid for.
            source = "estimate"
            duration = covered_seconds(rate, call.paid) if call.paid else 1
        blocks = blocks_for(rate, duration)
        if source != "cdr" and call.refused and blocks >= call.refused:
            # Our own clock runs late; the call ended where its paid time did.
            blocks = call.refused - 1
            duration = min(duration, covered_seconds(rate, blocks))
        # Every block the call reached past those paid is owed; those paid ahead for time
        # it never reached are given back; no block at all ends the hold.
        charges = tuple(Block(n, block_cost(rate, n)) for n in range(call.paid + 1, blocks + 1))
        refunds = tuple(Block(n, block_cost(rate, n)) for n in range(blocks + 1, call.paid + 1)
                        if block_cost(rate, n) > 0)
        return Finish(call.ref, info.account, info.number, rate, duration, blocks, call.paid,
                      call.answered_us, call.ended_us, call.cause, source, call.refused,
                      charges, refunds, blocks == 0, info.plan)


def _settlement(f: Finish, past_credit: list[int]) -> Settlement:
    """The call's settlement once its ledger changes are done: a block charged past the
    credit is where it would have been cut off."""
    rate = f.rate
    # The blocks' prices telescope: blocks 1..n cost what n blocks' seconds cost.
    charged = cost_of_billed(rate, covered_seconds(rate, f.blocks))
    if charged != cost(rate, f.duration):  # pragma: no cover - guarded by construction
        log.error("call %s: charged %s but the rate says %s", f.ref, charged,
                  cost(rate, f.duration))
    return Settlement(f.ref, f.account, f.number, rate.prefix, rate.name,
                      None if f.answered_us is None else f.answered_us / US,
                      None if f.ended_us is None else f.ended_us / US, f.duration,
                      billed_seconds(rate, f.duration), charged, f.blocks, f.cause, f.source,
                      f.cutoff or (past_credit[0] if past_credit else 0),
                      rate_json(rate), f.plan)


# -- dispatch -----------------------------------------------------------------------------

EventHandler = Callable[[Tracker, Mapping[str, str], int], list[Action]]
CallChange = Callable[[Tracker, Call, Mapping[str, str], int], None]

# What each AMI event means to the tracker; any other event with a tracked call's
# Uniqueid only shows that its channel is still up (Tracker._on_channel_event).
ON_EVENT: dict[str, EventHandler] = {
    "VarSet": Tracker._on_varset,
    "DialBegin": Tracker._on_dial_begin,
    "CoreShowChannel": Tracker._on_listed,
    "CoreShowChannelsComplete": Tracker._on_listing_done,
    "Cdr": Tracker._on_cdr,
}
# How a channel event changes the call it belongs to.
ON_CALL_EVENT: dict[str, CallChange] = {
    "DialEnd": Tracker._on_dial_end,
    "BridgeEnter": Tracker._on_bridge_enter,
    "Hangup": Tracker._on_hangup,
    "Rename": Tracker._on_rename,
}
