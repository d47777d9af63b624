"""The active rate deck, kept in Redis so every service and host rates alike.

Each imported deck is a hash of its own, ``{rates}:deck:<version>`` (prefix -> rate as JSON,
plus a marker field ``""``), and ``{rates}:version`` names the active one. A lookup is one
round trip whatever the deck's size: the version and one ``HMGET`` of the at most 20 prefixes
of the number. An import streams the file into a new version's hash in batches, switches the
version in one script, then deletes the old hash: readers see the old deck or the new one,
never a mix, and a failed import leaves nothing but a staging hash that expires.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prepaid import batching, keys, lua
from prepaid.batching import Call
from prepaid.errors import NoRateDeck, RateError, StoreUnavailable
from prepaid.ratedeck import Normalisation, RateDeck
from prepaid.rating import Rate
from prepaid.redis_client import REDIS_ERRORS, RedisClient, text

log = logging.getLogger(__name__)

STAGING_TTL = 3600  # seconds an interrupted import's hash is kept
BATCH = 5000  # rows per round trip while importing: bounds the memory an import takes
EXAMPLES = 5  # rows of each kind a dry run shows
MARKER = ""  # the field every deck hash holds: its absence means "no such deck"


def _rate(raw: bytes | str) -> Rate:
    return Rate(**json.loads(raw))


def encode(rate: Rate) -> str:
    """``asdict`` as JSON, spelled out: asdict's deep copy is most of a big import's time."""
    return json.dumps({"prefix": rate.prefix, "name": rate.name, "per_minute": rate.per_minute,
                       "connect_fee": rate.connect_fee, "initial": rate.initial,
                       "increment": rate.increment, "minimum": rate.minimum},
                      separators=(",", ":"))


@dataclass
class ImportReport:
    """What an import changed (or, in a dry run, would change)."""

    version: int = 0  # the new active version; 0 in a dry run
    rows: int = 0
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    examples: dict[str, list[str]] = field(
        default_factory=lambda: {"added": [], "changed": [], "removed": []})

    def note(self, kind: str, text: str) -> None:
        if len(self.examples[kind]) < EXAMPLES:
            self.examples[kind].append(text)


class RateStore:
    """Imports decks atomically and looks numbers up without reading the whole deck."""

    def __init__(self, client: RedisClient, prefix: str = "prepaid") -> None:
        self.redis = client
        # One hash tag: the swap and every lookup stay in one cluster slot.
        self._base = keys.rates_base(prefix)
        self.version_key = f"{self._base}:version"
        self.legacy_key = f"{self._base}:deck"  # the one hash of releases before versions
        self._next_key = f"{self._base}:next"
        self._next = client.register_script(lua.NEXT_RATES_VERSION)
        self._swap = client.register_script(lua.SWAP_RATES)
        self._version: int | None = None
        self._cached: tuple[int, RateDeck] | None = None

    def deck_key(self, version: int) -> str:
        return f"{self._base}:deck:{version}"

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc

    async def version(self) -> int:
        return int(await self._call(self.redis.get(self.version_key)) or 0)

    # -- reading ---------------------------------------------------------------
    async def match(self, digits: str) -> Rate | None:
        """The longest prefix of ``digits`` in the active deck: one round trip."""
        fields = [MARKER, *(digits[:n] for n in range(min(len(digits), 20), 0, -1))]
        version = self._version if self._version is not None else await self.version()
        for _ in range(4):  # a deck switched between our two reads: read again
            raw, values = await self._call(batching.of(self.redis).commands([
                Call("GET", [self.version_key]),
                Call("HMGET", [self.deck_key(version), *fields])]))
            now = int(raw or 0)
            if now == version and values[0] is not None:
                self._version = version
                return next((_rate(v) for v in values[1:] if v is not None), None)
            if now == version:
                break
            version = now
        if version == 0 or not await self._call(self.redis.exists(self.legacy_key)):
            raise NoRateDeck("no rate deck imported; run 'prepaid rates import FILE'")
        values = await self._call(self.redis.hmget(self.legacy_key, fields[1:]))
        return next((_rate(v) for v in values if v is not None), None)

    async def lookup(self, number: str, normalisation: Normalisation) -> Rate:
        digits = normalisation.normalise(number)
        rate = await self.match(digits)
        if rate is None:
            raise RateError(f"no rate for {number!r} (normalised {digits}); "
                            "calls there are refused")
        return rate

    async def _active_key(self) -> tuple[int, str]:
        version = await self.version()
        key = self.deck_key(version)
        if not await self._call(self.redis.hexists(key, MARKER)):
            if version and await self._call(self.redis.exists(self.legacy_key)):
                return version, self.legacy_key
            raise NoRateDeck("no rate deck imported; run 'prepaid rates import FILE'")
        return version, key

    async def scan(self) -> AsyncIterator[Rate]:
        """Every rate of the active deck, in no order, a batch at a time (for export)."""
        version, key = await self._active_key()
        cursor: int = 0
        while True:
            cursor, chunk = await self._call(self.redis.hscan(key, cursor, count=BATCH))
            for k, v in chunk.items():
                if text(k) != MARKER:
                    yield _rate(v)
            if cursor == 0:
                break
        if await self.version() != version:
            raise RateError("the rate deck was replaced while it was read; run again")

    async def current(self) -> RateDeck:
        """The whole active deck in memory (small decks, tests); cached by version."""
        version = await self.version()
        if self._cached is not None and self._cached[0] == version:
            return self._cached[1]
        deck = RateDeck([r async for r in self.scan()])
        self._cached = (version, deck)
        return deck

    # -- importing -------------------------------------------------------------
    async def replace(self, deck: RateDeck) -> int:
        """Swap the whole deck atomically; returns the new version."""
        report = await self.load(("<deck>", r) for r in deck)
        return report.version

    async def load(self, rows: Iterable[tuple[str, Rate]], *, dry_run: bool = False,
                   progress: Callable[[int], None] | None = None) -> ImportReport:
        """Stream ``(where, rate)`` rows into a new deck and make it active (all or none).

        A prefix that appears twice raises RateError naming its line. ``dry_run`` only
        reports what would change. ``progress`` is told the rows written after each batch.
        """
        report = ImportReport()
        version = int(await self._call(self._next(keys=[self._next_key, self.version_key])))
        staging = self.deck_key(version)
        try:
            old_version, old_key = await self._old_key()
            await self._call(self.redis.hset(staging, MARKER, "1"))
            await self._call(self.redis.expire(staging, STAGING_TTL))
            batch: dict[str, tuple[str, Rate]] = {}
            for where, rate in rows:
                if rate.prefix in batch:
                    raise RateError(f"{where}: prefix {rate.prefix} appears twice")
                batch[rate.prefix] = (where, rate)
                if len(batch) >= BATCH:
                    await self._write(staging, old_key, batch, report)
                    if progress is not None:
                        progress(report.rows)
                    batch = {}
            if batch:
                await self._write(staging, old_key, batch, report)
            if progress is not None:
                progress(report.rows)
            if not report.rows:
                raise RateError("no rates in the file")
            if old_key is not None:
                await self._removed(staging, old_key, report)
            if dry_run:
                return report
            replaced = await self._call(self._swap(keys=[staging, self.version_key],
                                                   args=[version]))
            if replaced is None:
                raise StoreUnavailable("the staged rate deck expired before it was swapped in")
            report.version = version
        finally:
            if not report.version:
                await self._discard(staging)
        self._version = version
        old = int(replaced)
        if old and old != version:
            await self._discard(self.deck_key(old))
        await self._discard(self.legacy_key)
        log.info("rate deck version %s active: %s rates", version, report.rows)
        return report

    async def _old_key(self) -> tuple[int, str | None]:
        try:
            return await self._active_key()
        except NoRateDeck:
            return 0, None

    async def _write(self, staging: str, old_key: str | None,
                     batch: dict[str, tuple[str, Rate]], report: ImportReport) -> None:
        prefixes = list(batch)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(staging, prefixes)
        if old_key is not None:
            pipe.hmget(old_key, prefixes)
        replies = await self._call(pipe.execute())
        for prefix, seen in zip(prefixes, replies[0], strict=True):
            if seen is not None:
                raise RateError(f"{batch[prefix][0]}: prefix {prefix} appears twice")
        mapping = {p: encode(r) for p, (_, r) in batch.items()}
        olds = replies[1] if old_key is not None else [None] * len(prefixes)
        for prefix, old in zip(prefixes, olds, strict=True):
            rate = batch[prefix][1]
            if old is None:
                report.added += 1
                report.note("added", f"{prefix} {rate.name}")
            elif text(old) != mapping[prefix]:
                report.changed += 1
                report.note("changed", f"{prefix} {_rate(old).name} -> {rate.name}"
                            if _rate(old).name != rate.name else f"{prefix} {rate.name}")
            else:
                report.unchanged += 1
        await self._call(self.redis.hset(staging, mapping=mapping))  # type: ignore[arg-type]
        report.rows += len(batch)

    async def _removed(self, staging: str, old_key: str, report: ImportReport) -> None:
        old_rows = int(await self._call(self.redis.hlen(old_key)))
        old_rows -= old_key != self.legacy_key  # the marker field
        report.removed = old_rows - report.changed - report.unchanged
        cursor: int = 0
        while report.removed and len(report.examples["removed"]) < min(EXAMPLES,
                                                                         report.removed):
            cursor, chunk = await self._call(self.redis.hscan(old_key, cursor, count=BATCH))
            rows = {text(k): v for k, v in chunk.items() if text(k) != MARKER}
            if rows:
                present = await self._call(self.redis.hmget(staging, list(rows)))
                for (prefix, raw), now in zip(rows.items(), present, strict=True):
                    if now is None:
                        report.note("removed", f"{prefix} {_rate(raw).name}")
            if cursor == 0:
                break

    async def _discard(self, key: str) -> None:
        try:
            await self.redis.unlink(key)  # freed in Redis's background: a big deck is O(1) here
        except REDIS_ERRORS as exc:  # it expires or is replaced; nothing is wrong with the deck
            log.warning("could not delete old rate deck %s: %s", key, exc)
