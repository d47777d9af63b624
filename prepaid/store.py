"""Opening the shared Redis once, for a command or a service, from the settings."""

from __future__ import annotations

from dataclasses import dataclass

from prepaid.config import Settings
from prepaid.errors import StoreUnavailable
from prepaid.ledger import DAY, Ledger
from prepaid.ratestore import RateStore
from prepaid.redis_client import REDIS_ERRORS, RedisClient, connect


@dataclass(frozen=True)
class Store:
    """The Redis client with the ledger and rate store on it."""

    settings: Settings
    redis: RedisClient
    ledger: Ledger
    rates: RateStore

    async def close(self) -> None:
        await self.redis.aclose()


async def open_store(settings: Settings, *, check: bool = True) -> Store:
    """Connect; with ``check`` a PING proves Redis answers, naming the URL if it doesn't."""
    client = connect(settings.redis.url, settings.redis.timeout, settings.redis.max_connections)
    if check:
        try:
            await client.ping()
        except REDIS_ERRORS as exc:
            await client.aclose()
            raise StoreUnavailable(
                f"cannot reach Redis at {settings.redis.safe_url}: {exc}") from None
    prefix = settings.redis.key_prefix
    ledger = Ledger(client, prefix, settings.redis.safe_url,
                    idempotency_seconds=settings.ledger.idempotency_days * DAY)
    return Store(settings, client, ledger,
                 RateStore(client, prefix, settings.billing.currency))
