"""The AGI routes, shared by FastAGI and process AGI: ``authorize``, ``balance`` and
``menu`` (the self-service menu, agi/ivr.py).

A route talks to the channel through an :class:`AgiSession` and to Redis through the
:class:`Store`; every Redis step is bounded by ``[agi] timeout`` and failures there are
reported through one shared :class:`OutageLog`. Before a call is authorized, this server's
metering must be OK (:class:`prepaid.health.MeteringGate`): a call nobody meters would be free.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from agi import ivr
from agi.decision import (
    PROMPT_REFUSED,
    Decision,
    Policy,
    Reason,
    decide,
    deny,
    dialed_number,
    on_failure,
    pick_account,
)
from agi.protocol import AgiError, AgiHangup, AgiSession
from agi.speech import balance_speech
from prepaid import callrecord, metrics, outcomes
from prepaid.callrecord import WARNING_FILE
from prepaid.config import Settings
from prepaid.errors import (
    InputError,
    LedgerError,
    NoRateDeck,
    RateError,
    StoreUnavailable,
    UnknownAccount,
)
from prepaid.health import MeteringGate
from prepaid.ledger import check_account_id
from prepaid.outage import OutageLog
from prepaid.store import Store

log = logging.getLogger(__name__)


def policy_of(settings: Settings) -> Policy:
    return Policy(max_call_seconds=settings.billing.max_call_seconds,
                  warning_ms=settings.agi.warning_ms,
                  hangup_on_deny=settings.agi.hangup_on_deny, fail_open=settings.agi.fail_open,
                  ring_seconds=settings.agi.ring_seconds)


LOOP_LATE_SECONDS = 0.2  # an event loop this late is short of CPU


def new_outage_log() -> OutageLog:
    return OutageLog(log, "Redis / rate deck")


@dataclass
class RouteContext:
    """What the calls of one FastAGI server (or one process AGI) share."""

    outage: OutageLog
    metering: MeteringGate
    # When each authorization in progress began (monotonic), oldest first.
    authorizing: dict[int, float] = dataclasses.field(default_factory=dict)
    refused_busy: int = 0  # calls refused BUSY in this spell (logged once, at its start)
    # How late this server's event loop has been running lately (s; the FastAGI server
    # measures it): a time-out then is this server short of CPU, not Redis.
    loop_late: float = 0.0
    overload: OutageLog = dataclasses.field(
        default_factory=lambda: OutageLog(log, "authorization capacity (this server's CPU)"))
    outcomes: outcomes.OutcomeLog | None = None  # where each call's outcome is logged
    outcome_outage: OutageLog = dataclasses.field(
        default_factory=lambda: OutageLog(log, "Redis (logging authorization outcomes)"))

    background: set[asyncio.Task[None]] = dataclasses.field(default_factory=set)

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` without waiting for it (kept referenced until it is done)."""
        task = asyncio.ensure_future(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def drain(self) -> None:
        """Wait for the background work (a process AGI before it exits)."""
        if self.background:
            await asyncio.gather(*self.background, return_exceptions=True)

    def oldest(self, now: float) -> float:
        """How long the oldest authorization in progress has been going on (s)."""
        return now - next(iter(self.authorizing.values()), now)


def new_context(store: Store, *, watching_since: float | None) -> RouteContext:
    """``watching_since``: see :class:`MeteringGate` (the FastAGI server's start, or None)."""
    agi = store.settings.agi
    return RouteContext(new_outage_log(), MeteringGate.for_settings(
        store.redis, store.settings, watching_since=watching_since),
        outcomes=outcomes.OutcomeLog(store.redis, store.settings.redis.key_prefix,
                                     keep=agi.outcomes_keep, days=agi.outcomes_days))


@dataclass
class _Progress:
    """How far the store phase got, so a timeout or hangup can undo a reservation."""

    account: str = ""
    reserving: bool = False
    reserved: bool = False
    record: callrecord.CallRecord | None = None


async def _caller(session: AgiSession, settings: Settings) -> tuple[str, str]:
    """The paying account and the call's linkedid, in one AGI round trip (a linkedid never
    holds '/'; an account that does fails check_account_id later)."""
    sources = settings.agi.account_sources
    if "variable" not in sources:
        return (pick_account(sources, session.env, None),
                await session.get_full_variable("${CHANNEL(linkedid)}"))
    linkedid, _, variable = (
        await session.get_full_variable("${CHANNEL(linkedid)}/${PREPAID_ACCOUNT}")
    ).partition("/")
    return pick_account(sources, session.env, variable), linkedid


async def _account_id(session: AgiSession, settings: Settings) -> str:
    sources = settings.agi.account_sources
    variable = await session.get_variable("PREPAID_ACCOUNT") if "variable" in sources else None
    return pick_account(sources, session.env, variable)


async def _store_phase(store: Store, account_id: str, number: str, ref: str, policy: Policy,
                       progress: _Progress) -> Decision:
    """Look up account and rate, decide, and reserve the first block. Raises StoreUnavailable
    or RateError (no deck) for the fail-safe path."""
    try:
        check_account_id(account_id)
        account = await store.ledger.get(account_id)
    except (InputError, UnknownAccount):
        return deny(Reason.UNKNOWN_ACCOUNT, policy)
    norm = store.settings.billing.normalisation
    try:
        # The account's plan's deck, and its currency: one round trip, any deck size.
        quote = await store.rates.quote(number, norm, account.plan)
        digits = norm.normalise(number)
    except NoRateDeck:
        raise
    except RateError as exc:
        log.info("call %s from %s: %s", ref, account_id, exc)
        return deny(Reason.NO_RATE, policy)
    if quote.currency != account.currency:  # never converted: refused until the admin fixes it
        log.error("call %s from %s refused (DENIED CURRENCY): the account is in %s but its "
                  "plan %r is rated in %s; move it to a plan in %s ('prepaid account set "
                  "%s --plan PLAN')", ref, account_id, account.currency, account.plan,
                  quote.currency, account.currency, account_id)
        return deny(Reason.CURRENCY, policy)
    rate = quote.rate
    first = decide(status=account.status, balance=account.balance, threshold=account.threshold,
                   rate=rate, available=account.available, policy=policy)
    if not first.allowed:
        return first
    progress.account, progress.reserving = account_id, True
    try:
        change = await store.ledger.reserve(account_id, callrecord.hold_id(ref), first.hold,
                                             key=f"auth:{ref}", ref=f"call to {number}")
    except LedgerError as exc:
        progress.reserving = False
        if exc.code in ("NO_CREDIT", "SUSPENDED"):
            return deny(Reason(exc.code), policy)
        if exc.code == "IDEM_CONFLICT":  # authorized before, for another destination
            return _in_call(ref, account_id, policy)
        log.warning("call %s from %s: reservation refused: %s", ref, account_id, exc)
        return deny(Reason.INTERNAL, policy)
    if change.duplicate:
        progress.reserving = False  # the hold is the live call's, not this attempt's
        return _in_call(ref, account_id, policy)
    progress.reserved = True
    # The credit this call may use: what is not held by the account's other live calls.
    decision = decide(status=account.status, balance=account.balance,
                      threshold=account.threshold, rate=rate,
                      available=change.available + change.hold_amount, policy=policy)
    progress.record = callrecord.CallRecord(
        account=account_id, number=number, digits=digits, rate=rate, hold=change.hold_amount,
        max_seconds=decision.max_seconds, channel="", uniqueid=ref, plan=account.plan)
    return decision


def _in_call(ref: str, account_id: str, policy: Policy) -> Decision:
    """This channel was authorized before: a live metered call that came back into the
    dialplan (a transfer into [prepaid-outbound]). Authorizing it again would reset its
    live-call record, so it is refused and its first authorization stands."""
    log.warning("call %s from %s: already authorized once; refused (transferred into the "
                "prepaid context?)", ref, account_id)
    return deny(Reason.IN_CALL, policy)


async def _duplicate(store: Store, progress: _Progress, ref: str, account_id: str,
                     policy: Policy, exc: callrecord.RecordExists) -> Decision:
    """Another account's live call has this uniqueid: its record and hold stay as they are,
    this account's new hold goes back and the call is refused."""
    log.error("call %s from %s refused (ERROR DUPLICATE_CALL): %s; that call's record and "
              "hold are kept", ref, account_id, exc)
    progress.record = None  # the record is the other call's: never mark it released
    await _release(store, progress, ref, "uniqueid of another live call")
    progress.reserved = progress.reserving = False
    return deny(Reason.DUPLICATE_CALL, policy)


async def _release(store: Store, progress: _Progress, ref: str, why: str) -> None:
    """Give back the reservation of a call that will not go ahead (best effort, bounded)."""
    try:
        async with asyncio.timeout(store.settings.agi.timeout):
            try:
                await store.ledger.release(progress.account, callrecord.hold_id(ref),
                                           key=f"rel:{ref}", ref=why)
            except LedgerError as exc:
                if exc.code != "NO_HOLD":
                    raise
            if progress.record is not None:
                await callrecord.released(store.redis, store.settings.redis.key_prefix, ref)
        log.info("call %s from %s: hold released (%s)", ref, progress.account, why)
    except (TimeoutError, StoreUnavailable, LedgerError) as exc:
        log.error("call %s from %s: could not release hold %s: %s", ref, progress.account,
                  callrecord.hold_id(ref), exc)


async def _set_variables(session: AgiSession, decision: Decision, account: str,
                         ref: str) -> None:
    values = {"PREPAID_STATUS": decision.status.value, "PREPAID_REASON": decision.reason.value,
              "PREPAID_ACCOUNT": account, "PREPAID_CALLREF": ref,
              "PREPAID_MAX_SECONDS": str(decision.max_seconds),
              "PREPAID_DIAL_LIMIT": decision.dial_limit}
    if decision.allowed:
        values |= {"LIMIT_WARNING_FILE": WARNING_FILE,
                   "PREPAID_WARNING_LIMIT": decision.warning_limit,
                   "PREPAID_LOW_BALANCE": "1" if decision.low_balance else "0",
                   "PREPAID_RING_SECONDS": str(decision.ring_seconds),
                   "PREPAID_TIMEOUT": str(decision.timeout)}
    await session.set_variables(values)


async def authorize(session: AgiSession, store: Store, ctx: RouteContext) -> Decision:
    """Decide whether the caller may dial, reserve the first block, tell the dialplan.

    While an authorization in progress has taken longer than ``[agi] busy_seconds``, refuse
    at once (ERROR, BUSY): an overloaded server refuses cleanly instead of letting every new
    call wait out ``[agi] timeout``. A burst the server keeps up with is served whole."""
    now = time.monotonic()
    oldest = ctx.oldest(now)
    if oldest > store.settings.agi.busy_seconds:
        return await _refuse_busy(session, store, ctx, oldest)
    if ctx.refused_busy:
        log.info("authorizing again: %s call(s) were refused BUSY", ctx.refused_busy)
        ctx.refused_busy = 0
    key = id(session)
    ctx.authorizing[key] = now
    try:
        return await _authorize(session, store, ctx)
    finally:
        del ctx.authorizing[key]


async def _refuse_busy(session: AgiSession, store: Store, ctx: RouteContext,
                       oldest: float) -> Decision:
    settings = store.settings
    decision = deny(Reason.BUSY, policy_of(settings))
    ref = session.env.get("agi_uniqueid", "").strip()
    if not ctx.refused_busy:
        log.warning("an authorization has taken %.1f s ([agi] busy_seconds %g), %s in "
                    "progress: new calls are refused (ERROR BUSY) until they are quicker",
                    oldest, settings.agi.busy_seconds, len(ctx.authorizing))
    ctx.refused_busy += 1
    metrics.AUTHORIZATIONS.labels(decision.status.value, decision.reason.value).inc()
    log.info("call %s: %s %s (%s being authorized, the oldest for %.1f s)", ref,
             decision.status.value, decision.reason.value, len(ctx.authorizing), oldest)
    await _set_variables(session, decision, "", ref)
    return decision


async def _record(session: AgiSession, store: Store, progress: _Progress, decision: Decision,
                  ref: str, account_id: str, linkedid: str, policy: Policy) -> Decision:
    """Write an allowed call's record (channel, linkedid, when); one already there makes
    this a duplicate AGI for a live call."""
    if not decision.allowed or progress.record is None:
        return decision
    progress.record = record = dataclasses.replace(
        progress.record, linkedid=linkedid, authorized=time.time(),
        channel=session.env.get("agi_channel", ""))
    try:
        await callrecord.write(store.redis, store.settings.redis.key_prefix, record)
    except callrecord.RecordExists as exc:
        return await _duplicate(store, progress, ref, account_id, policy, exc)
    return decision


async def _authorize(session: AgiSession, store: Store, ctx: RouteContext) -> Decision:
    settings = store.settings
    outage = ctx.outage
    policy = policy_of(settings)
    ref = session.env.get("agi_uniqueid", "").strip()
    number = dialed_number(session.args, session.env)
    progress = _Progress()
    account_id, linkedid = await _caller(session, settings)
    started = time.monotonic()
    redis_down = False
    if not ref:
        log.warning("AGI authorize without agi_uniqueid from channel %r; refused",
                    session.env.get("agi_channel", ""))
        decision = deny(Reason.INTERNAL, policy)
    else:
        try:
            async with asyncio.timeout(settings.agi.timeout):
                # First, so a call that would go unbilled reserves nothing. The gate logs
                # its changes once; with allow_unmetered the call goes on, unbilled.
                metering = await ctx.metering.check()
                if not metering.ok and not settings.agi.allow_unmetered:
                    decision = deny(Reason.NO_METERING, policy)
                else:
                    decision = await _store_phase(store, account_id, number, ref, policy,
                                                  progress)
                decision = await _record(session, store, progress, decision, ref,
                                         account_id, linkedid, policy)
            outage.success()
            ctx.overload.success()
        except AgiError as exc:  # the channel went away or broke protocol mid-way
            if progress.reserving or progress.reserved:
                await _release(store, progress, ref, f"authorization ended: {exc}")
            raise
        except (StoreUnavailable, RateError, TimeoutError) as exc:
            overloaded = isinstance(exc, TimeoutError) and ctx.loop_late > LOOP_LATE_SECONDS
            if overloaded:
                ctx.overload.failure(
                    f"no answer within {settings.agi.timeout:g} s while this server's event "
                    f"loop ran {ctx.loop_late:.1f} s late (short of CPU; Redis is not to "
                    "blame); new calls are refused (ERROR BUSY) meanwhile")
            else:
                if isinstance(exc, TimeoutError):
                    exc = TimeoutError(f"no answer within {settings.agi.timeout:g} s")
                outage.failure(exc)
            if progress.reserving or progress.reserved:
                await _release(store, progress, ref, "authorization failed")
            decision = deny(Reason.BUSY, policy) if overloaded else on_failure(policy)
            redis_down = not isinstance(exc, RateError)
    elapsed = time.monotonic() - started
    metrics.AUTHORIZATIONS.labels(decision.status.value, decision.reason.value).inc()
    metrics.AUTHORIZATION_SECONDS.observe(elapsed)
    log.info("call %s account %r to %r: %s %s max %ss (%.0f ms)", ref, account_id, number,
             decision.status.value, decision.reason.value, decision.max_seconds, elapsed * 1000)
    # Logged while the dialplan is told, and never waited for: no round trip is added to
    # the call's set-up. Not while Redis is known to be away (it would wait out a time-out).
    if not redis_down:
        ctx.in_background(_note(store, ctx, decision, account_id, number, ref))
    try:
        await _set_variables(session, decision, account_id, ref)
        if not decision.allowed and decision.hangup:
            await session.answer()
            await session.stream_file(decision.prompt)
            await session.hangup()
    except AgiError as exc:
        if progress.reserved:
            await _release(store, progress, ref, f"authorization ended: {exc}")
        raise
    return decision


async def _note(store: Store, ctx: RouteContext, decision: Decision, account_id: str,
                number: str, ref: str) -> None:
    """Log the call's outcome for ``prepaid calls --refused``; never fails the call."""
    if ctx.outcomes is None:
        return
    try:
        async with asyncio.timeout(store.settings.agi.timeout):
            await ctx.outcomes.note(account_id, decision.status.value, decision.reason.value,
                                    number, ref, decision.max_seconds)
        ctx.outcome_outage.success()
    except (StoreUnavailable, TimeoutError) as exc:
        ctx.outcome_outage.failure(exc)


async def balance(session: AgiSession, store: Store, ctx: RouteContext) -> None:
    """IVR balance: 'your balance is 9 euros and 50 cents'."""
    outage = ctx.outage
    account_id = await _account_id(session, store.settings)
    await session.answer()
    try:
        async with asyncio.timeout(store.settings.agi.timeout):
            check_account_id(account_id)
            account = await store.ledger.get(account_id)
        outage.success()
    except (InputError, UnknownAccount):
        log.info("balance request for unknown account %r", account_id)
        await session.stream_file("prepaid/account-unknown")
        return
    except (StoreUnavailable, TimeoutError) as exc:
        outage.failure(exc)
        await session.stream_file(PROMPT_REFUSED)
        return
    for kind, value in balance_speech(account.balance, account.currency):
        if kind == "number":
            await session.say_number(int(value))
        else:
            await session.stream_file(str(value))


async def self_service(session: AgiSession, store: Store, ctx: RouteContext) -> None:
    """IVR self-service menu (``*101``): PIN, balance, top-ups from the card, settings."""
    await ivr.menu(session, store, ctx.outage)


Route = Callable[[AgiSession, Store, RouteContext], Awaitable[object]]
ROUTES: dict[str, Route] = {"authorize": authorize, "balance": balance, "menu": self_service}


async def dispatch(session: AgiSession, store: Store, ctx: RouteContext) -> None:
    """Run the route the session asks for; a hangup or protocol error ends it quietly."""
    route = ROUTES.get(session.script)
    if route is None:
        log.warning("AGI request for unknown route %r from channel %r (known: %s)",
                    session.script, session.env.get("agi_channel", ""), ", ".join(ROUTES))
        return
    try:
        await route(session, store, ctx)
    except AgiHangup as exc:
        log.info("AGI %s on %s ended: %s", session.script, session.env.get("agi_channel", ""),
                 exc)
    except AgiError as exc:
        log.warning("AGI %s on %s failed: %s", session.script,
                    session.env.get("agi_channel", ""), exc)
