"""The active rate deck, kept in Redis so every service and host rates alike."""

from __future__ import annotations

import logging
import secrets

from prepaid.errors import RateError, StoreUnavailable
from prepaid.ledger import REDIS_ERRORS, RedisClient
from prepaid.ratedeck import RateDeck

log = logging.getLogger(__name__)

STAGING_TTL = 3600  # seconds an interrupted import's staging hash is kept

_SWAP_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('PERSIST', KEYS[2])
return redis.call('INCR', KEYS[3])
"""


class RateStore:
    """Imports decks atomically and serves a cached copy, reloaded when a new one lands."""

    def __init__(self, client: RedisClient, prefix: str = "prepaid") -> None:
        self.redis = client
        # One hash tag so the swap (RENAME + INCR) stays in one cluster slot.
        self.deck_key = f"{prefix}:{{rates}}:deck"
        self.version_key = f"{prefix}:{{rates}}:version"
        self._staging_prefix = f"{prefix}:{{rates}}:staging"
        self._swap = client.register_script(_SWAP_LUA)
        self._cached: tuple[int, RateDeck] | None = None

    async def replace(self, deck: RateDeck) -> int:
        """Swap the whole deck atomically; returns the new version.

        The new deck is written to a staging hash of its own (plain commands: nobody reads
        it), then one script renames it over the active deck and bumps the version, so
        readers see the old deck or the new one, never a mix; an import that dies half-way
        leaves only a staging hash that expires.
        """
        staging = f"{self._staging_prefix}:{secrets.token_hex(8)}"
        try:
            await self.redis.hset(staging, mapping=deck.to_mapping())  # type: ignore[arg-type]
            await self.redis.expire(staging, STAGING_TTL)
            version = await self._swap(keys=[staging, self.deck_key, self.version_key])
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc
        if version is None:
            raise StoreUnavailable("the staged rate deck expired before it was swapped in")
        return int(version)

    async def current(self) -> RateDeck:
        """The active deck; one GET per call to see whether it changed."""
        try:
            raw = await self.redis.get(self.version_key)
            version = int(raw or 0)
            if self._cached is not None and self._cached[0] == version:
                return self._cached[1]
            mapping = await self.redis.hgetall(self.deck_key)
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc
        if not mapping:
            raise RateError("no rate deck imported; run 'prepaid rates import FILE'")
        deck = RateDeck.from_mapping({_text(k): _text(v) for k, v in mapping.items()})
        log.info("rate deck version %s loaded: %s rates", version, len(deck))
        self._cached = (version, deck)
        return deck


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
