"""The live call record the AGI writes at authorization and metering reads (shared contract).

Key ``<prefix>:callref:<ref>``, a hash with account, number, digits, rate (JSON of the Rate),
hold, max_seconds, authorized, channel, uniqueid, linkedid, state; it expires
max_seconds + 3600 s after authorization.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

from prepaid.errors import StoreUnavailable
from prepaid.ledger import REDIS_ERRORS, RedisClient
from prepaid.rating import Rate

EXPIRY_MARGIN = 3600

# One key each: scripts, not MULTI, so they run alike on a single Redis and a Cluster.
_WRITE_LUA = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""
_STATE_LUA = """
redis.call('HSET', KEYS[1], 'state', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


def record_key(prefix: str, ref: str) -> str:
    return f"{prefix}:callref:{ref}"


def hold_id(ref: str) -> str:
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

    def to_hash(self) -> dict[str, str]:
        return {
            "account": self.account, "number": self.number, "digits": self.digits,
            "rate": json.dumps(dataclasses.asdict(self.rate)), "hold": str(self.hold),
            "max_seconds": str(self.max_seconds),
            "authorized": f"{self.authorized or time.time():.3f}", "channel": self.channel,
            "uniqueid": self.uniqueid, "linkedid": self.linkedid, "state": self.state,
        }

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> CallRecord:
        return cls(account=h["account"], number=h.get("number", ""), digits=h.get("digits", ""),
                   rate=Rate(**json.loads(h["rate"])), hold=int(h.get("hold", "0")),
                   max_seconds=int(h.get("max_seconds", "0")), channel=h.get("channel", ""),
                   uniqueid=h.get("uniqueid", ""), linkedid=h.get("linkedid", ""),
                   authorized=float(h.get("authorized", "0")),
                   state=h.get("state", "authorized"))


async def write(client: RedisClient, prefix: str, record: CallRecord) -> None:
    key = record_key(prefix, record.uniqueid)
    fields = [x for kv in record.to_hash().items() for x in kv]
    try:
        await client.register_script(_WRITE_LUA)(
            keys=[key], args=[str(record.max_seconds + EXPIRY_MARGIN), *fields])
    except REDIS_ERRORS as exc:
        raise StoreUnavailable(f"Redis is unavailable writing call {record.uniqueid}: {exc}"
                               ) from exc


async def set_state(client: RedisClient, prefix: str, ref: str, state: str) -> None:
    """Mark a record (e.g. 'released' when the caller hung up during authorization)."""
    try:
        await client.register_script(_STATE_LUA)(
            keys=[record_key(prefix, ref)], args=[state, str(EXPIRY_MARGIN)])
    except REDIS_ERRORS as exc:
        raise StoreUnavailable(f"Redis is unavailable updating call {ref}: {exc}") from exc


async def read(client: RedisClient, prefix: str, ref: str) -> CallRecord | None:
    try:
        raw = await client.hgetall(record_key(prefix, ref))
    except REDIS_ERRORS as exc:
        raise StoreUnavailable(f"Redis is unavailable reading call {ref}: {exc}") from exc
    if not raw:
        return None
    return CallRecord.from_hash({_text(k): _text(v) for k, v in raw.items()})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
