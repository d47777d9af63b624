"""The live-call record: the contract between the AGI, which authorizes a call, and the
listener, which meters it. Every write of a record goes through this module.

Key ``<prefix>:callref:<ref>``, a hash with account, number, digits, rate (JSON of the Rate:
the call is billed at it to the end, whatever deck is imported meanwhile), plan, hold,
max_seconds, authorized, channel, uniqueid, linkedid, state, and later answered_at,
blocks_paid, cdr_billsec, finished, settlement, logged. Its ``state``:

- ``authorized`` (:func:`write`, the AGI): the first block is held as ``hold_id(ref)``;
- ``released`` (:func:`released`, the AGI): the call did not go ahead, the hold is back;
- ``answered`` (:func:`answered`, the listener): blocks are being paid;
- ``ended`` (:func:`ended`, the listener), after :func:`finish` kept the first finisher's
  settlement: the call is in the account's history.

It expires max_seconds + 3600 s after authorization, FINISHED_TTL after it is finished
and ENDED_TTL after it has ended.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

from prepaid import batching, keys, lua
from prepaid.errors import StoreUnavailable
from prepaid.rating import Rate
from prepaid.redis_client import REDIS_ERRORS, RedisClient, text

EXPIRY_MARGIN = 3600
FINISHED_TTL = 7 * 86400  # a settled call not yet in the account's history waits this long
ENDED_TTL = 3600
# The prompt Asterisk plays a minute before a call's credit ends: the AGI names it for
# Dial's L() and the listener for its ChanSpy whisper.
WARNING_FILE = "prepaid/credit-expires-in-one-minute"


def record_key(prefix: str, ref: str) -> str:
    return keys.call_record(prefix, ref)


def record_pattern(prefix: str) -> str:
    """Every record's key, for SCAN; the reference is the key's last part."""
    return keys.call_record_pattern(prefix)


def hold_id(ref: str) -> str:
    """The ledger hold of the call's first block."""
    return f"call:{ref}"


@dataclass(frozen=True, slots=True)
class CallRecord:
    account: str
    number: str
    digits: str
    rate: Rate
    hold: int
    max_seconds: int
    channel: str
    uniqueid: str
    linkedid: str = ""
    authorized: float = 0.0
    state: str = "authorized"
    plan: str = ""  # the plan whose deck gave ``rate`` (records before plans have none)

    def to_hash(self) -> dict[str, str]:
        return {
            "account": self.account, "number": self.number, "digits": self.digits,
            "rate": json.dumps(dataclasses.asdict(self.rate)), "hold": str(self.hold),
            "max_seconds": str(self.max_seconds),
            "authorized": f"{self.authorized or time.time():.3f}", "channel": self.channel,
            "uniqueid": self.uniqueid, "linkedid": self.linkedid, "state": self.state,
            "plan": self.plan,
        }

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> CallRecord:
        return cls(account=h["account"], number=h.get("number", ""), digits=h.get("digits", ""),
                   rate=Rate(**json.loads(h["rate"])), hold=int(h.get("hold", "0")),
                   max_seconds=int(h.get("max_seconds", "0")), channel=h.get("channel", ""),
                   uniqueid=h.get("uniqueid", ""), linkedid=h.get("linkedid", ""),
                   authorized=float(h.get("authorized", "0")),
                   state=h.get("state", "authorized"), plan=h.get("plan", ""))


class RecordExists(Exception):
    """A record of this reference exists already: it is kept, this one is not written."""

    def __init__(self, ref: str, account: str, state: str) -> None:
        super().__init__(f"call {ref} has a record already (account {account!r}, state "
                         f"{state!r}); a uniqueid is never authorized twice")
        self.ref, self.account, self.state = ref, account, state


async def write(client: RedisClient, prefix: str, record: CallRecord) -> None:
    """A new record (state ``authorized``), atomically only if its reference has none:
    RecordExists otherwise, and the existing record is untouched."""
    key = record_key(prefix, record.uniqueid)
    fields = [x for kv in record.to_hash().items() for x in kv]
    try:
        done = await batching.of(client).script(
            lua.CALL_WRITE, [key], [str(record.max_seconds + EXPIRY_MARGIN), *fields])
    except REDIS_ERRORS as exc:
        raise StoreUnavailable(f"Redis is unavailable writing call {record.uniqueid}: {exc}"
                               ) from exc
    if isinstance(done, list):
        account, state = (text(v) if v is not None else "" for v in done)
        raise RecordExists(record.uniqueid, account, state)


async def released(client: RedisClient, prefix: str, ref: str) -> None:
    """The caller hung up (or the AGI gave up) during authorization: the hold is back."""
    try:
        await batching.of(client).script(
            lua.CALL_STATE, [record_key(prefix, ref)], ["released", str(EXPIRY_MARGIN)])
    except REDIS_ERRORS as exc:
        raise StoreUnavailable(f"Redis is unavailable updating call {ref}: {exc}") from exc


async def answered(client: RedisClient, prefix: str, ref: str, *, answered_us: int,
                   blocks_paid: int) -> None:
    """The call was answered and its blocks up to ``blocks_paid`` are paid."""
    await _call(batching.of(client).command(
        "HSET", record_key(prefix, ref), "state", "answered",
        "answered_at", f"{answered_us / 1_000_000:.6f}", "blocks_paid", str(blocks_paid)))


async def note_cdr(client: RedisClient, prefix: str, ref: str, billsec: int) -> None:
    """Asterisk's CDR said how long the call was billable (kept for a restarted listener)."""
    await _call(client.hset(record_key(prefix, ref), "cdr_billsec", str(billsec)))


async def finish(client: RedisClient, prefix: str, ref: str, settlement: str) -> str | None:
    """Keep ``settlement`` (JSON) unless another finisher came first; return the kept one."""
    stored = await _call(batching.of(client).script(
        lua.CALL_FINISH, [record_key(prefix, ref)],
        [f"{time.time():.3f}", settlement, str(FINISHED_TTL)]))
    return text(stored) if isinstance(stored, (bytes, str)) else None


async def ended(client: RedisClient, prefix: str, ref: str, now: str) -> None:
    """The settlement is in the account's history (logged at ``now``)."""
    await _call(batching.of(client).script(lua.CALL_ENDED, [record_key(prefix, ref)],
                                           [now, str(ENDED_TTL)]))


async def read(client: RedisClient, prefix: str, ref: str) -> CallRecord | None:
    try:
        raw = await client.hgetall(record_key(prefix, ref))
    except REDIS_ERRORS as exc:
        raise StoreUnavailable(f"Redis is unavailable reading call {ref}: {exc}") from exc
    if not raw:
        return None
    return CallRecord.from_hash({text(k): text(v) for k, v in raw.items()})


async def _call(pending: Any) -> Any:
    try:
        return await pending
    except REDIS_ERRORS as exc:
        raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc

