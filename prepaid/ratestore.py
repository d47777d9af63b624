"""The active rate deck, kept in Redis so every service and host rates alike."""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from prepaid.errors import RateError, StoreUnavailable
from prepaid.ratedeck import RateDeck

log = logging.getLogger(__name__)


class RateStore:
    """Imports decks atomically and serves a cached copy, reloaded when a new one lands."""

    def __init__(self, client: aioredis.Redis, prefix: str = "prepaid") -> None:
        self.redis = client
        # One hash tag so the swap (RENAME + INCR) stays in one cluster slot.
        self.deck_key = f"{prefix}:{{rates}}:deck"
        self.version_key = f"{prefix}:{{rates}}:version"
        self._staging_key = f"{prefix}:{{rates}}:staging"
        self._cached: tuple[int, RateDeck] | None = None

    async def replace(self, deck: RateDeck) -> int:
        """Swap the whole deck in one transaction; returns the new version."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._staging_key)
                pipe.hset(self._staging_key, mapping=deck.to_mapping())  # type: ignore[arg-type]
                pipe.rename(self._staging_key, self.deck_key)
                pipe.incr(self.version_key)
                result = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc
        return int(result[-1])

    async def current(self) -> RateDeck:
        """The active deck; one GET per call to see whether it changed."""
        try:
            raw = await self.redis.get(self.version_key)
            version = int(raw or 0)
            if self._cached is not None and self._cached[0] == version:
                return self._cached[1]
            mapping = await self.redis.hgetall(self.deck_key)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc}") from exc
        if not mapping:
            raise RateError("no rate deck imported; run 'prepaid rates import FILE'")
        deck = RateDeck.from_mapping({_text(k): _text(v) for k, v in mapping.items()})
        log.info("rate deck version %s loaded: %s rates", version, len(deck))
        self._cached = (version, deck)
        return deck


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
