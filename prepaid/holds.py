"""Holds of live calls: who owns each, how old it is, and giving back the ones left behind.

A call's hold ``call:<ref>`` is owned by the Asterisk whose uniqueid ``ref`` is (the
``systemname`` prefix, or none) and lives as long as the call's live-call record: that
server's metering listener settles it when the call ends. A hold whose record is gone or
no longer live, or whose call is older than the longest call allowed, is an orphan; the
owner's listener gives it back (:func:`reap`), and the admin can (``prepaid holds``).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

from prepaid import callrecord, keys
from prepaid.errors import LedgerError, StoreUnavailable
from prepaid.ledger import Change, Ledger
from prepaid.redis_client import REDIS_ERRORS

log = logging.getLogger(__name__)

CALL_HOLD = "call:"
_PREFIXED_UNIQUEID = re.compile(r"^(.+)-[0-9]+\.[0-9]+$")
LIVE_STATES = ("authorized", "answered")


def owner_of(ref: str) -> str:
    """The systemname of the Asterisk a uniqueid comes from ('' for a server without)."""
    match = _PREFIXED_UNIQUEID.match(ref)
    return match.group(1) if match else ""


@dataclass(frozen=True, slots=True)
class HoldInfo:
    account: str
    hold: str
    ref: str  # the call's reference ('' for a hold that is not a call's)
    amount: int
    owner: str  # the owning server's systemname ('' for one without)
    state: str  # of the call's record; '' when it has none
    channel: str
    age: float | None  # seconds since the call was authorized; None without a record

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def to_json(self) -> dict[str, object]:
        return {"account": self.account, "hold": self.hold, "ref": self.ref,
                "amount": self.amount, "owner": self.owner, "state": self.state,
                "channel": self.channel,
                "age_seconds": None if self.age is None else round(self.age, 3)}


async def list_holds(ledger: Ledger, account: str, *, now: float | None = None
                     ) -> list[HoldInfo]:
    """Every hold of ``account``, oldest call first (holds without a record last)."""
    now = time.time() if now is None else now
    holds = await ledger.holds(account)
    out = []
    for hold, amount in holds.items():
        ref = hold[len(CALL_HOLD):] if hold.startswith(CALL_HOLD) else ""
        record = await callrecord.read(ledger.redis, ledger.prefix, ref) if ref else None
        # A record of another account under this ref is not this hold's call.
        if record is not None and record.account != account:
            record = None
        out.append(HoldInfo(
            account=account, hold=hold, ref=ref, amount=amount, owner=owner_of(ref),
            state=record.state if record else "", channel=record.channel if record else "",
            age=now - record.authorized if record and record.authorized else None))
    out.sort(key=lambda h: (h.age is None, -(h.age or 0.0)))
    return out


async def release(ledger: Ledger, account: str, ref_or_hold: str, *, why: str,
                  force: bool = False) -> Change:
    """Give a hold back through the ledger (one idempotency key per hold, a history entry).
    A repeat is a duplicate; a hold that is not there is LedgerError NO_HOLD. The hold of a
    call whose record says it is live (authorized or answered) is its metering's to settle:
    LedgerError LIVE_CALL unless ``force``, and nothing changes."""
    hold = ref_or_hold if ref_or_hold.startswith(CALL_HOLD) else callrecord.hold_id(ref_or_hold)
    if not force:
        ref = hold[len(CALL_HOLD):]
        record = await callrecord.read(ledger.redis, ledger.prefix, ref)
        if (record is not None and record.account == account and record.state in LIVE_STATES
                and hold in await ledger.holds(account)):
            age = f", authorized {time.time() - record.authorized:.0f} s ago" \
                if record.authorized else ""
            raise LedgerError("LIVE_CALL", (
                f"hold {hold} of account {account!r} belongs to a live call (state "
                f"{record.state}, server {owner_of(ref) or '(no systemname)'}{age}): its "
                "metering settles it when the call ends; --force releases it anyway"))
    return await ledger.release(account, hold, key=f"release:{hold}", ref=why)


def orphaned(info: HoldInfo, *, system_name: str, live: set[str], max_age: float) -> str:
    """Why this server gives ``info`` back ('' to keep it). Only holds of this server's
    calls that its listener does not meter: the record says the hold went back
    (``released``) or is gone, or the call is older than ``max_age`` (a backstop). A record
    being settled or ended keeps its hold: the settlement takes it."""
    if not info.ref or info.owner != system_name or info.ref in live:
        return ""
    if not info.state:
        return "its call has no record"
    if info.state == "released":
        return "its call's record says it was released"
    if info.age is not None and info.age > max_age:
        return f"its call was authorized {info.age:.0f} s ago (more than {max_age:g} s)"
    return ""


async def reap(ledger: Ledger, *, system_name: str, live: set[str], max_age: float,
               suspects: set[str], now: float | None = None) -> tuple[list[HoldInfo], set[str]]:
    """Release the holds of this server's calls that :func:`orphaned` names. A hold found
    orphaned for the first time only becomes a suspect (its call may be being authorized
    this very moment, its record not yet written); it is released when the next pass, with
    the ``suspects`` this one returns, finds it orphaned again. Returns (released, suspects)."""
    now = time.time() if now is None else now
    head, tail = keys.account_pattern(ledger.prefix, "holds")
    try:
        found = [k async for k in ledger.redis.scan_iter(f"{head}*{tail}", count=1000)]
    except REDIS_ERRORS as exc:
        raise StoreUnavailable(f"Redis is unavailable listing holds: {exc}") from exc
    released, seen = [], set()
    for key in found:
        name = key.decode() if isinstance(key, bytes) else str(key)
        account = name[len(head):-len(tail)]
        for info in await list_holds(ledger, account, now=now):
            why = orphaned(info, system_name=system_name, live=live, max_age=max_age)
            if not why:
                continue
            if f"{account}/{info.hold}" not in suspects:
                seen.add(f"{account}/{info.hold}")
                continue
            try:
                await release(ledger, account, info.hold, why=f"orphaned hold: {why}",
                              force=True)  # orphaned() decided, old live records too
            except LedgerError as exc:
                if exc.code != "NO_HOLD":  # settled meanwhile: nothing to do
                    raise
                continue
            log.warning("hold %s of account %s (%s micro-units) released: %s", info.hold,
                        account, info.amount, why)
            released.append(info)
    return released, seen
