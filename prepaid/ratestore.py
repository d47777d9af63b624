"""The active rate deck of each plan, kept in Redis so every service and host rates alike.

A plan (a customer group: ``default``, ``gold`` ...) has one active deck. Each imported deck
is a hash of its own, ``{rates}:deck:<version>`` (prefix -> rate as JSON, plus a marker field
``""`` holding the deck's currency), and the plan's version key names the active one:
``{rates}:version`` for the plan ``default`` (the key of releases before plans, so their deck
is that plan's), ``{rates}:version:<plan>`` for the others. ``{rates}:plans`` maps each
imported plan to its currency. Versions count across plans, so a deck's key never repeats.

A lookup is one round trip whatever the deck's size: the plan's version and one ``HMGET`` of
the marker (the currency) and the at most 20 prefixes of the number. An import streams the
file into a new version's hash in batches, switches the plan's version in one script, then
deletes the old hash: readers see the old deck or the new one, never a mix, and a failed
import leaves nothing but a staging hash that expires.
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
from prepaid.ratedeck import DEFAULT_PLAN, Normalisation, RateDeck, check_plan
from prepaid.rating import Rate
from prepaid.redis_client import REDIS_ERRORS, RedisClient, text

log = logging.getLogger(__name__)

STAGING_TTL = 3600  # seconds an interrupted import's hash is kept
BATCH = 5000  # rows per round trip while importing: bounds the memory an import takes
EXAMPLES = 5  # rows of each kind a dry run shows
MARKER = ""  # the field every deck hash holds, its currency: its absence means "no such deck"
LEGACY_MARKER = "1"  # the marker of decks imported before plans: the default currency


def _rate(raw: bytes | str) -> Rate:
    return Rate(**json.loads(raw))


def encode(rate: Rate) -> str:
    """``asdict`` as JSON, spelled out: asdict's deep copy is most of a big import's time."""
    return json.dumps({"prefix": rate.prefix, "name": rate.name, "per_minute": rate.per_minute,
                       "connect_fee": rate.connect_fee, "initial": rate.initial,
                       "increment": rate.increment, "minimum": rate.minimum},
                      separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Quote:
    """A number's rate in a plan, and the currency of the plan's deck."""

    rate: Rate
    currency: str
    plan: str


@dataclass(frozen=True, slots=True)
class PlanInfo:
    plan: str
    currency: str
    version: int
    rates: int


def _no_deck(plan: str) -> NoRateDeck:
    if plan == DEFAULT_PLAN:
        return NoRateDeck("no rate deck imported; run 'prepaid rates import FILE'")
    return NoRateDeck(f"no rate deck imported for plan {plan!r}; run "
                      f"'prepaid rates import FILE --plan {plan}'")


@dataclass
class ImportReport:
    """What an import changed (or, in a dry run, would change)."""

    version: int = 0  # the new active version; 0 in a dry run
    plan: str = DEFAULT_PLAN
    currency: str = ""
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
    """Imports decks atomically and looks numbers up without reading the whole deck.

    ``currency`` is the currency of decks imported before plans (``[billing] currency``)."""

    def __init__(self, client: RedisClient, prefix: str = "prepaid",
                 currency: str = "EUR") -> None:
        self.redis = client
        self.currency = currency
        # One hash tag: the swap and every lookup stay in one cluster slot.
        self._base = keys.rates_base(prefix)
        self.legacy_key = f"{self._base}:deck"  # the one hash of releases before versions
        self.plans_key = f"{self._base}:plans"
        self._next_key = f"{self._base}:next"
        self._next = client.register_script(lua.NEXT_RATES_VERSION)
        self._swap = client.register_script(lua.SWAP_RATES)
        self._version: dict[str, int] = {}
        self._cached: dict[str, tuple[int, RateDeck]] = {}

    @property
    def version_key(self) -> str:
        return self.plan_version_key(DEFAULT_PLAN)

    def plan_version_key(self, plan: str) -> str:
        check_plan(plan)
        return f"{self._base}:version" + ("" if plan == DEFAULT_PLAN else f":{plan}")

    def deck_key(self, version: int) -> str:
        return f"{self._base}:deck:{version}"

    def _currency(self, marker: bytes | str) -> str:
        value = text(marker)
        return self.currency if value == LEGACY_MARKER else value

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc

    async def version(self, plan: str = DEFAULT_PLAN) -> int:
        return int(await self._call(self.redis.get(self.plan_version_key(plan))) or 0)

    # -- reading ---------------------------------------------------------------
    async def match(self, digits: str, plan: str = DEFAULT_PLAN) -> Rate | None:
        """The longest prefix of ``digits`` in the plan's active deck: one round trip."""
        return (await self._match(digits, plan))[0]

    async def _match(self, digits: str, plan: str) -> tuple[Rate | None, str]:
        """The longest matching rate and the deck's currency, in one round trip."""
        fields = [MARKER, *(digits[:n] for n in range(min(len(digits), 20), 0, -1))]
        version_key = self.plan_version_key(plan)
        version = self._version[plan] if plan in self._version else await self.version(plan)
        for _ in range(4):  # a deck switched between our two reads: read again
            raw, values = await self._call(batching.of(self.redis).commands([
                Call("GET", [version_key]),
                Call("HMGET", [self.deck_key(version), *fields])]))
            now = int(raw or 0)
            if now == version and values[0] is not None:
                self._version[plan] = version
                return (next((_rate(v) for v in values[1:] if v is not None), None),
                        self._currency(values[0]))
            if now == version:
                break
            version = now
        if (version == 0 or plan != DEFAULT_PLAN
                or not await self._call(self.redis.exists(self.legacy_key))):
            raise _no_deck(plan)
        values = await self._call(self.redis.hmget(self.legacy_key, fields[1:]))
        return next((_rate(v) for v in values if v is not None), None), self.currency

    async def quote(self, number: str, normalisation: Normalisation,
                    plan: str = DEFAULT_PLAN) -> Quote:
        """The rate of ``number`` in ``plan`` and the deck's currency: one round trip."""
        digits = normalisation.normalise(number)
        rate, currency = await self._match(digits, plan)
        if rate is None:
            where = "" if plan == DEFAULT_PLAN else f" in plan {plan!r}"
            raise RateError(f"no rate for {number!r} (normalised {digits}){where}; "
                            "calls there are refused")
        return Quote(rate, currency, plan)

    async def lookup(self, number: str, normalisation: Normalisation,
                     plan: str = DEFAULT_PLAN) -> Rate:
        return (await self.quote(number, normalisation, plan)).rate

    async def _active_key(self, plan: str) -> tuple[int, str]:
        version = await self.version(plan)
        key = self.deck_key(version)
        if not await self._call(self.redis.hexists(key, MARKER)):
            if (version and plan == DEFAULT_PLAN
                    and await self._call(self.redis.exists(self.legacy_key))):
                return version, self.legacy_key
            raise _no_deck(plan)
        return version, key

    async def plan_currency(self, plan: str) -> str | None:
        """The currency of the plan's deck; None when the plan has no deck."""
        stored = await self._call(self.redis.hget(self.plans_key, check_plan(plan)))
        if stored is not None:
            return text(stored)
        try:
            await self._active_key(plan)  # a default deck imported before plans
        except NoRateDeck:
            return None
        return self.currency

    async def _deck_currency(self, plan: str) -> str:
        """A new deck's currency when none is given: the plan's, else the store's."""
        return await self.plan_currency(plan) or self.currency

    async def plans(self) -> list[PlanInfo]:
        """Every plan with a deck: its currency, active version and number of rates."""
        found = {text(k): text(v) for k, v in
                 (await self._call(self.redis.hgetall(self.plans_key))).items()}
        if DEFAULT_PLAN not in found and await self.plan_currency(DEFAULT_PLAN) is not None:
            found[DEFAULT_PLAN] = self.currency
        out = []
        for plan, currency in sorted(found.items()):
            try:
                version, key = await self._active_key(plan)
            except NoRateDeck:
                continue
            size = int(await self._call(self.redis.hlen(key))) - (key != self.legacy_key)
            out.append(PlanInfo(plan, currency, version, size))
        return out

    async def scan(self, plan: str = DEFAULT_PLAN) -> AsyncIterator[Rate]:
        """Every rate of the plan's active deck, in no order, a batch at a time (export)."""
        version, key = await self._active_key(plan)
        cursor: int = 0
        while True:
            cursor, chunk = await self._call(self.redis.hscan(key, cursor, count=BATCH))
            for k, v in chunk.items():
                if text(k) != MARKER:
                    yield _rate(v)
            if cursor == 0:
                break
        if await self.version(plan) != version:
            raise RateError("the rate deck was replaced while it was read; run again")

    async def current(self, plan: str = DEFAULT_PLAN) -> RateDeck:
        """The plan's whole active deck in memory (small decks, tests); cached by version."""
        version = await self.version(plan)
        cached = self._cached.get(plan)
        if cached is not None and cached[0] == version:
            return cached[1]
        deck = RateDeck([r async for r in self.scan(plan)])
        self._cached[plan] = (version, deck)
        return deck

    # -- importing -------------------------------------------------------------
    async def replace(self, deck: RateDeck, plan: str = DEFAULT_PLAN,
                      currency: str | None = None) -> int:
        """Swap the plan's whole deck atomically; returns the new version."""
        report = await self.load((("<deck>", r) for r in deck), plan=plan, currency=currency)
        return report.version

    async def load(self, rows: Iterable[tuple[str, Rate]], *, plan: str = DEFAULT_PLAN,
                   currency: str | None = None, dry_run: bool = False,
                   progress: Callable[[int], None] | None = None) -> ImportReport:
        """Stream ``(where, rate)`` rows into a new deck of ``plan`` in ``currency`` (default:
        the plan's, else the store's) and make it the plan's active one (all or none).

        A prefix that appears twice raises RateError naming its line. ``dry_run`` only
        reports what would change. ``progress`` is told the rows written after each batch.
        Whether accounts on the plan can take the currency is the caller's to check
        (prepaid/plans.py).
        """
        version_key = self.plan_version_key(plan)
        currency = currency or await self._deck_currency(plan)
        report = ImportReport(plan=plan, currency=currency)
        version = int(await self._call(self._next(keys=[self._next_key, version_key])))
        staging = self.deck_key(version)
        try:
            old_version, old_key = await self._old_key(plan)
            await self._call(self.redis.hset(staging, MARKER, currency))
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
            replaced = await self._call(self._swap(
                keys=[staging, version_key, self.plans_key], args=[version, plan, currency]))
            if replaced is None:
                raise StoreUnavailable("the staged rate deck expired before it was swapped in")
            report.version = version
        finally:
            if not report.version:
                await self._discard(staging)
        await self._retire(plan, version, int(replaced))
        log.info("rate deck version %s active for plan %s (%s): %s rates", version, plan,
                 currency, report.rows)
        return report

    async def _retire(self, plan: str, version: int, old: int) -> None:
        """The plan's deck ``old`` was replaced by ``version``: delete it."""
        self._version[plan] = version
        if old and old != version:
            await self._discard(self.deck_key(old))
        if plan == DEFAULT_PLAN:
            await self._discard(self.legacy_key)

    async def _old_key(self, plan: str) -> tuple[int, str | None]:
        try:
            return await self._active_key(plan)
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
