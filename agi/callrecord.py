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

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from prepaid.errors import StoreUnavailable
from prepaid.rating import Rate

EXPIRY_MARGIN = 3600


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


async def write(client: aioredis.Redis, prefix: str, record: CallRecord) -> None:
    key = record_key(prefix, record.uniqueid)
    try:
        async with client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=record.to_hash())  # type: ignore[arg-type]
            pipe.expire(key, record.max_seconds + EXPIRY_MARGIN)
            await pipe.execute()
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(f"Redis is unavailable writing call {record.uniqueid}: {exc}"
                               ) from exc


async def set_state(client: aioredis.Redis, prefix: str, ref: str, state: str) -> None:
    """Mark a record (e.g. 'released' when the caller hung up during authorization)."""
    try:
        async with client.pipeline(transaction=True) as pipe:
            pipe.hset(record_key(prefix, ref), "state", state)
            pipe.expire(record_key(prefix, ref), EXPIRY_MARGIN)
            await pipe.execute()
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(f"Redis is unavailable updating call {ref}: {exc}") from exc


async def read(client: aioredis.Redis, prefix: str, ref: str) -> CallRecord | None:
    try:
        raw = await client.hgetall(record_key(prefix, ref))
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(f"Redis is unavailable reading call {ref}: {exc}") from exc
    if not raw:
        return None
    return CallRecord.from_hash({_text(k): _text(v) for k, v in raw.items()})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
