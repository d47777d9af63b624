"""The dead-letter stream: where an event whose handling keeps failing is parked.

A worker reading a stream through :class:`prepaid.streams.ConsumerGroup` (the policy
outbox, phone top-up requests, the mail queue) reports each handling that raised (a bad
record, a bug; never an outage, which is retried without limit). Each failure is counted
per entry (``P:{deadletters}:attempts:<stream>:<id>``, kept a week); the one that reaches
``[policy] dead_letter_after`` copies the entry, with the error text and the attempts, to
``P:{deadletters}`` and acknowledges it in its stream, so it is never delivered again and
the worker goes on with the others. ``prepaid dead-letters`` lists them; ``retry`` puts one
back into its stream (a new entry, handled as a new event) once the record is fixed, and
removes it here; ``drop`` removes it.

Each step is one command and safe to repeat. A worker that dies between the copy and the
acknowledgement parks the event twice (it is handled again first); a ``retry`` that dies
between putting back and removing leaves it here too. Either way the event may be handled
twice, which every stream's handling already allows (its idempotency keys).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from prepaid import keys, metrics
from prepaid.errors import InputError
from prepaid.redis_client import RedisClient, text

log = logging.getLogger(__name__)

ATTEMPTS_TTL = 7 * 86400
ERROR_CHARS = 1000  # of the error text kept with a dead letter
_FIELD = b"f:"  # the original fields are kept under this prefix, bytes as they were
_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}", re.ASCII)


@dataclass(frozen=True)
class DeadLetter:
    id: str  # in the dead-letter stream
    stream: str  # where it came from, and goes back to on retry
    group: str
    source_id: str  # its id there
    error: str
    attempts: int
    at: float
    fields: dict[bytes, bytes]

    @property
    def account(self) -> str:
        return self.fields.get(b"account", b"").decode(errors="replace")

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "stream": self.stream, "group": self.group,
                "source_id": self.source_id, "error": self.error, "attempts": self.attempts,
                "at": self.at, "account": self.account or None,
                "fields": {k.decode(errors="replace"): v.decode(errors="replace")
                           for k, v in self.fields.items()}}


def error_text(exc: BaseException) -> str:
    """One line naming the exception: what a dead letter and its log line say."""
    raw = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return raw.replace("\r", "\\r").replace("\n", "\\n")[:ERROR_CHARS]


def check_id(entry_id: str) -> str:
    if not _ID.fullmatch(entry_id):
        raise InputError(f"dead letter id {entry_id!r} must look like 1733140000000-0 (see "
                         "'prepaid dead-letters')")
    return entry_id


class DeadLetters:
    def __init__(self, client: RedisClient, prefix: str = "prepaid") -> None:
        self.redis = client
        self.prefix = prefix
        self.key = keys.dead_letters(prefix)

    def _label(self, stream: str) -> str:
        return stream.removeprefix(f"{self.prefix}:")

    async def failed(self, stream: str, group: str, entry_id: str, fields: dict[bytes, bytes],
                     exc: BaseException, limit: int) -> bool:
        """Count one failed handling of ``entry_id``; park it once it has failed ``limit``
        times. True when parked (and acknowledged in ``stream``)."""
        counter = keys.dead_letter_attempts(self.prefix, stream, entry_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(counter)
            pipe.expire(counter, ATTEMPTS_TTL)
            attempts = int((await pipe.execute())[0])
        label = self._label(stream)
        metrics.EVENT_FAILURES.labels(label).inc()
        why = error_text(exc)
        if attempts < limit:
            # The first failure with its traceback (a bug is found from it), the next ones
            # in one line each.
            log.log(logging.ERROR if attempts == 1 else logging.WARNING,
                    "%s event %s failed (attempt %s of %s, then it is parked in the "
                    "dead-letter stream): %s", label, entry_id, attempts, limit, why,
                    exc_info=exc if attempts == 1 else None)
            return False
        await self.redis.xadd(self.key, {
            b"stream": stream, b"group": group, b"id": entry_id, b"error": why,
            b"attempts": str(attempts), b"at": f"{time.time():.3f}",
            **{_FIELD + k: v for k, v in fields.items()}})
        await self.redis.xack(stream, group, entry_id)
        await self.redis.delete(counter)
        metrics.DEAD_LETTERS.labels(label).inc()
        log.error("%s event %s failed %s times; parked in the dead-letter stream (last "
                  "error: %s); fix its record, then 'prepaid dead-letters retry ID'",
                  label, entry_id, attempts, why)
        return True

    async def succeeded(self, stream: str, entry_id: str) -> None:
        """Forget the failures of an entry that was handled after all."""
        await self.redis.delete(keys.dead_letter_attempts(self.prefix, stream, entry_id))

    async def list(self, count: int = 1000) -> list[DeadLetter]:
        rows: Any = await self.redis.xrange(self.key, count=count)
        return [_letter(text(i), f) for i, f in rows]

    async def get(self, entry_id: str) -> DeadLetter:
        rows: Any = await self.redis.xrange(self.key, check_id(entry_id), entry_id, count=1)
        if not rows:
            raise InputError(f"no dead letter {entry_id} ('prepaid dead-letters' lists them)")
        return _letter(text(rows[0][0]), rows[0][1])

    async def retry(self, letter: DeadLetter) -> str:
        """Put ``letter`` back into its stream as a new entry; remove it here. The new id."""
        fields: dict[Any, Any] = dict(letter.fields)
        new: Any = await self.redis.xadd(letter.stream, fields)
        await self.redis.xdel(self.key, letter.id)
        log.info("dead letter %s put back into %s as %s", letter.id, letter.stream, text(new))
        return text(new)

    async def drop(self, letter: DeadLetter) -> None:
        await self.redis.xdel(self.key, letter.id)
        log.info("dead letter %s (%s event %s) dropped", letter.id, letter.stream,
                 letter.source_id)


def _letter(entry_id: str, raw: dict[bytes, bytes]) -> DeadLetter:
    def field(name: bytes) -> str:
        return raw.get(name, b"").decode(errors="replace")

    try:
        attempts, at = int(field(b"attempts") or 0), float(field(b"at") or 0)
    except ValueError:
        attempts, at = 0, 0.0
    return DeadLetter(entry_id, field(b"stream"), field(b"group"), field(b"id"),
                      field(b"error"), attempts, at,
                      {k[len(_FIELD):]: v for k, v in raw.items() if k.startswith(_FIELD)})
