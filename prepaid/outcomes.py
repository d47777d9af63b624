"""Authorization outcomes, allowed and refused, kept per account for a bounded time: what
``prepaid calls ACCOUNT --refused`` answers "why was this call refused?" from.

Each outcome is one entry of the account's stream ``{acct:ID}:outcomes`` (status, reason,
number, call reference, the Asterisk server and the AGI host; its time is the entry id,
Redis's clock), written by one script that caps the stream at ``[agi] outcomes_keep``
entries and ``[agi] outcomes_days`` of age (approximately: Redis trims whole nodes) and
lets the key expire when the account stops calling. Refusals for accounts that do not
exist go to one shared stream capped at ten times as many, so made-up account ids create
no keys.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from prepaid import batching, keys, lua, pages
from prepaid.errors import InputError, StoreUnavailable
from prepaid.holds import owner_of
from prepaid.ledger import check_account_id
from prepaid.redis_client import REDIS_ERRORS, RedisClient

UNKNOWN_FACTOR = 10  # the shared stream of unknown accounts keeps this many times more
_MAX_TEXT = 80  # an account id or number as dialed may be anything: kept this long at most


@dataclass(frozen=True, slots=True)
class Outcome:
    id: str  # the stream entry id: Redis's time in ms
    account: str
    status: str  # ALLOWED, DENIED, ERROR
    reason: str  # '' when allowed; NO_CREDIT, SUSPENDED, UNKNOWN_ACCOUNT ...
    number: str
    ref: str
    server: str  # the Asterisk's systemname ('' for one without)
    host: str  # the host whose AGI service decided
    max_seconds: int

    @property
    def time(self) -> float:
        return int(self.id.split("-", 1)[0]) / 1000

    @property
    def allowed(self) -> bool:
        return self.status == "ALLOWED"

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "account": self.account, "status": self.status,
                "reason": self.reason, "number": self.number, "ref": self.ref,
                "server": self.server, "host": self.host, "max_seconds": self.max_seconds}

    @classmethod
    def from_entry(cls, entry_id: str, f: dict[str, str], account: str = "") -> Outcome:
        return cls(entry_id, f.get("account", account), f.get("status", ""),
                   f.get("reason", ""), f.get("number", ""), f.get("ref", ""),
                   f.get("server", ""), f.get("host", ""), int(f.get("max_seconds") or 0))


class OutcomeLog:
    """Writes outcomes: one script run per call, batched with the turn's other commands."""

    def __init__(self, client: RedisClient, prefix: str, *, keep: int, days: int,
                 host: str | None = None) -> None:
        self.redis, self.prefix = client, prefix
        self.keep, self.max_age_ms = keep, days * 86_400_000
        self.host = socket.gethostname() if host is None else host

    @property
    def enabled(self) -> bool:
        return self.keep > 0 and self.max_age_ms > 0

    async def note(self, account: str, status: str, reason: str, number: str, ref: str,
                   max_seconds: int = 0) -> None:
        """Log one outcome; raises StoreUnavailable when Redis cannot take it."""
        if not self.enabled:
            return
        fields = ["status", status, "reason", reason, "number", number[:_MAX_TEXT],
                  "ref", ref[:_MAX_TEXT], "server", owner_of(ref)[:_MAX_TEXT],
                  "host", self.host, "max_seconds", str(max_seconds)]
        batch = batching.of(self.redis)
        try:
            if _valid(account) and reason != "UNKNOWN_ACCOUNT":
                if await batch.script(
                        lua.OUTCOME_LOG,
                        [keys.outcomes(self.prefix, account), keys.account(self.prefix, account)],
                        [str(self.keep), str(self.max_age_ms), *fields]):
                    return
            await batch.script(lua.OUTCOME_LOG, [keys.unknown_outcomes(self.prefix)],
                               [str(self.keep * UNKNOWN_FACTOR), str(self.max_age_ms),
                                "account", account[:_MAX_TEXT], *fields])
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"Redis is unavailable logging call {ref}'s outcome: "
                                   f"{exc}") from exc


def _valid(account: str) -> bool:
    try:
        check_account_id(account)
    except InputError:
        return False
    return True


async def read(client: RedisClient, prefix: str, account: str, *, start: str = "-",
               end: str = "+", refused_only: bool = False, unknown: bool = False
               ) -> AsyncIterator[Outcome]:
    """The account's outcomes, newest first, in pages; ``unknown``: those logged in the
    shared stream of unknown accounts under this id instead."""
    key = keys.unknown_outcomes(prefix) if unknown else keys.outcomes(prefix, account)
    async for entry_id, f in pages.entries(client, key, start, end, newest_first=True):
        outcome = Outcome.from_entry(entry_id, f, account)
        if unknown and outcome.account != account:
            continue
        if refused_only and outcome.allowed:
            continue
        yield outcome


async def has_unknown(client: RedisClient, prefix: str, account: str) -> bool:
    """Whether refusals of ``account`` as an unknown account are still kept."""
    async for _ in read(client, prefix, account, unknown=True):
        return True
    return False

