"""Pure threshold-policy decisions: given the account, the event, the caps and the time,
say what to do.  No I/O here, so every rule is tested without Redis, SMTP or sleeping."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from prepaid.config import PolicySettings
from prepaid.errors import InputError
from prepaid.money import format_amount

Kind = Literal["ignore", "warn", "topup", "refuse"]


@dataclass(frozen=True, slots=True)
class Event:
    """One threshold crossing from the outbox stream (written by prepaid/ledger.lua)."""

    id: str  # outbox stream entry id
    account: str
    crossing: str  # history entry id of the change that crossed: the idempotency root
    action: str
    balance: int
    threshold: int
    topup_amount: int


def parse_event(entry_id: str, fields: dict[str, str]) -> Event:
    """Check an outbox entry; InputError names the entry and the bad field."""
    def need(name: str) -> str:
        value = fields.get(name)
        if not value:
            raise InputError(f"outbox entry {entry_id}: field {name!r} is missing")
        return value

    def number(name: str) -> int:
        raw = need(name)
        try:
            return int(raw)
        except ValueError:
            raise InputError(f"outbox entry {entry_id}: field {name!r} = {raw!r} is not a "
                             "whole number of micro-units") from None

    return Event(entry_id, need("account"), need("crossing"), need("action"),
                 number("balance"), number("threshold"), number("topup_amount"))


@dataclass(frozen=True, slots=True)
class State:
    """What the worker read about the account just before deciding."""

    currency: str
    email: str
    status: str
    balance: int
    threshold: int
    action: str
    policy_enabled: bool
    topup_amount: int
    has_card: bool
    declines: int = 0
    decline_until: float = 0.0
    topups_today: int = 0  # top-ups started today, not counting declined ones
    amount_today: int = 0
    started_amount: int = 0  # > 0 when a charge for this very event was already started


@dataclass(frozen=True, slots=True)
class Decision:
    kind: Kind
    amount: int = 0
    reason: str = ""  # for ignore/refuse: why, in words a customer understands


def topup_refusal(state: State, caps: PolicySettings, now: float) -> str | None:
    """Why an automatic top-up may not run now (no card, over a cap, declined lately)."""
    money = state.currency
    if not state.has_card:
        return "no card is stored for automatic top-ups"
    if state.topup_amount <= 0:
        return "no automatic top-up amount is set"
    if state.topup_amount > caps.max_topup:
        return f"the top-up amount is above the maximum of {format_amount(caps.max_topup, money)}"
    if now < state.decline_until:
        return ("the card was declined recently; the next automatic attempt is allowed after "
                f"{stamp(state.decline_until)}")
    if state.topups_today >= caps.daily_topups:
        return f"the daily limit of {caps.daily_topups} automatic top-ups is reached"
    if state.amount_today + state.topup_amount > caps.daily_topup_amount:
        return ("the daily automatic top-up limit of "
                f"{format_amount(caps.daily_topup_amount, money)} would be exceeded")
    return None


def decide(state: State, caps: PolicySettings, now: float) -> Decision:
    if state.started_amount > 0:
        # A worker died mid top-up: finish it with the same idempotency key, whatever changed.
        return Decision("topup", state.started_amount)
    if not state.policy_enabled or state.action == "none":
        return Decision("ignore", reason="the low-balance policy is switched off")
    if state.balance >= state.threshold:
        return Decision("ignore", reason="the balance is back at or above the threshold")
    if state.status != "active":
        return Decision("ignore", reason=f"the account is {state.status}")
    if state.action == "email":
        if not state.email:
            return Decision("ignore", reason="the account has no e-mail address")
        return Decision("warn")
    if state.action != "topup":
        return Decision("ignore", reason=f"unknown action {state.action!r}")
    refusal = topup_refusal(state, caps, now)
    if refusal is not None:
        return Decision("refuse", reason=refusal)
    return Decision("topup", state.topup_amount)


@dataclass(frozen=True, slots=True)
class AfterDecline:
    declines: int
    decline_until: float
    switch_to_email: bool


def after_decline(declines_before: int, caps: PolicySettings, now: float) -> AfterDecline:
    """Count one more consecutive decline; back off, and give up on top-ups after too many."""
    declines = declines_before + 1
    return AfterDecline(declines, now + caps.decline_backoff_seconds,
                        caps.max_declines > 0 and declines >= caps.max_declines)


def day_of(now: float) -> str:
    """The UTC day a top-up counts against, as YYYYMMDD."""
    return time.strftime("%Y%m%d", time.gmtime(now))


def stamp(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(when))


def retry_delay(failures: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Exponential backoff for SMTP and gateway retries: 1, 2, 4, ... seconds, at most ``cap``."""
    if failures <= 0:
        return 0.0
    return float(min(cap, base * 2 ** min(failures - 1, 30)))
