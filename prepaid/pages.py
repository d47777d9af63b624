"""Reading a stream in pages (XRANGE / XREVRANGE ``COUNT``), so a long one is never held
in memory whole: reports and exports walk histories and call logs of any length."""

from __future__ import annotations

from collections.abc import AsyncIterator

from prepaid.errors import StoreUnavailable
from prepaid.redis_client import REDIS_ERRORS, RedisClient, text

PAGE = 500


def ms_id(ms: int, *, end: bool = False) -> str:
    """The first (or, with ``end``, the last) stream id of millisecond ``ms``."""
    return f"{ms}-{2**64 - 1}" if end else f"{ms}-0"


async def entries(client: RedisClient, key: str, start: str = "-", end: str = "+", *,
                  newest_first: bool = False, page: int = PAGE
                  ) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """Each entry of ``key`` from ``start`` to ``end`` (ids, inclusive), one page per
    round trip, as (id, fields) with text values."""
    while True:
        try:
            if newest_first:
                rows = await client.xrevrange(key, end, start, count=page)
            else:
                rows = await client.xrange(key, start, end, count=page)
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"Redis is unavailable reading {key}: {exc}") from exc
        rows = rows or []
        for entry_id, fields in rows:
            yield text(entry_id), {text(k): text(v) for k, v in (fields or {}).items()}
        if len(rows) < page:
            return
        last = text(rows[-1][0])  # the next page starts past it ('(': exclusive, Redis 6.2)
        if newest_first:
            end = f"({last}"
        else:
            start = f"({last}"
