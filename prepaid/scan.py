"""Finding every account with SCAN (on every node of a Cluster), for the audit and the
archive: the account index may miss one whose creation was cut short."""

from __future__ import annotations

from collections.abc import AsyncIterator

from prepaid import keys
from prepaid.redis_client import RedisClient, text


def _glob(literal: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in literal)


async def account_batches(redis: RedisClient, prefix: str, batch: int
                          ) -> AsyncIterator[list[str]]:
    """Account ids in batches: every key ``<prefix>:{acct:ID}`` (a hash), on every node."""
    head = keys.account(prefix, "")[:-1]  # "<prefix>:{acct:"
    ids: list[str] = []
    async for key in redis.scan_iter(match=f"{_glob(head)}*}}", count=1000, _type="hash"):
        account = text(key)[len(head):-1]
        if account and account not in ids:
            ids.append(account)
        if len(ids) >= batch:
            yield ids
            ids = []
    if ids:
        yield ids
