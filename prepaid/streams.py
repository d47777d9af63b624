"""Reading a Redis stream through a consumer group: the one helper of the policy worker
(the ledger's outbox) and the mail worker (the mail queue).

Each fetch takes one batch, in one deliberate order:

1. this consumer's own pending entries (delivered to it, not acknowledged: an earlier
   attempt failed or was left to retry), once they have been idle ``retry_idle_ms``;
2. entries idle ``claim_idle_ms`` in any consumer's hands, claimed with XAUTOCLAIM (a
   worker that died keeps its entries pending forever otherwise);
3. new entries, waiting up to ``block_ms`` for one.

A later step runs only when the earlier ones found nothing, so a retry is never starved by
new work, and new work waits behind at most one batch. ``retry_idle_ms`` is how soon a
consumer tries its own failures again: 0 for the mail worker (it backs off by itself while
SMTP is down), ``claim_idle_ms`` for the policy worker (a top-up that waits for a lock or
for a gateway retry must not spin).

A handling that raises (a bad record, a bug; not an outage) is reported with ``failed``:
after ``dead_letter_after`` failures the entry is parked in the dead-letter stream
(prepaid/deadletters.py), so one bad event never stops a worker or comes back forever.
"""

from __future__ import annotations

from typing import Any

from redis.exceptions import ResponseError

from prepaid.deadletters import DeadLetters
from prepaid.redis_client import RedisClient, text

Entry = tuple[str, dict[bytes, bytes]]  # the entry id and its fields, as Redis sent them


class ConsumerGroup:
    def __init__(self, client: RedisClient, stream: str, group: str, consumer: str, *,
                 claim_idle_ms: int, retry_idle_ms: int = 0, batch: int = 20,
                 dead_letters: DeadLetters | None = None, dead_letter_after: int = 5) -> None:
        self.redis = client
        self.dead_letters = dead_letters
        self.dead_letter_after = dead_letter_after
        self._failed: set[str] = set()  # entries whose handling failed here, not yet done
        self.stream, self.group, self.consumer = stream, group, consumer
        self.claim_idle_ms, self.retry_idle_ms, self.batch = claim_idle_ms, retry_idle_ms, batch
        self._ready = False
        self._cursor = "0-0"  # where XAUTOCLAIM goes on

    async def ensure(self) -> None:
        """Create the group (and the stream) once; one that exists already is fine."""
        if self._ready:
            return
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._ready = True

    async def fetch(self, block_ms: int | None = None) -> list[Entry]:
        """One batch: own pending, then claimed, then new (see the module docstring)."""
        await self.ensure()
        rows = await self._own_pending()
        if not rows:
            claimed: Any = await self.redis.xautoclaim(
                self.stream, self.group, self.consumer, self.claim_idle_ms, self._cursor,
                count=self.batch)
            self._cursor = text(claimed[0])
            rows = list(claimed[1])
        if not rows:
            new: Any = await self.redis.xreadgroup(self.group, self.consumer,
                                                   {self.stream: ">"}, count=self.batch,
                                                   block=block_ms)
            rows = list(new[0][1]) if new else []
        return [(text(i), f or {}) for i, f in rows]

    async def ack(self, entry_id: str) -> None:
        await self.redis.xack(self.stream, self.group, entry_id)
        if entry_id in self._failed:
            self._failed.discard(entry_id)
            if self.dead_letters is not None:
                await self.dead_letters.succeeded(self.stream, entry_id)

    async def failed(self, entry_id: str, fields: dict[bytes, bytes],
                     exc: BaseException) -> bool:
        """The handling of ``entry_id`` raised (not an outage): counted, and parked in the
        dead-letter stream once it has failed ``dead_letter_after`` times (prepaid/
        deadletters.py). True when parked; else it stays pending and is tried again."""
        if self.dead_letters is None:
            raise exc
        parked = await self.dead_letters.failed(self.stream, self.group, entry_id, fields, exc,
                                                self.dead_letter_after)
        (self._failed.discard if parked else self._failed.add)(entry_id)
        return parked

    async def _own_pending(self) -> list[Any]:
        if not self.retry_idle_ms:  # all of them: one round trip
            own: Any = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: "0"},
                                                   count=self.batch)
            return list(own[0][1]) if own else []
        pending: Any = await self.redis.xpending_range(
            self.stream, self.group, min="-", max="+", count=self.batch,
            consumername=self.consumer, idle=self.retry_idle_ms)
        if not pending:
            return []
        claimed: Any = await self.redis.xclaim(
            self.stream, self.group, self.consumer, self.retry_idle_ms,
            [p["message_id"] for p in pending])
        return list(claimed)
