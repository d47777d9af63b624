from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from prepaid.ledger import Ledger
from prepaid.redis_client import connect
from testbed.servers import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if redis_server.proc is None:  # a test stopped it
        redis_server.start()
    redis_server.flush()
    return redis_server.url


@pytest.fixture
async def ledger(redis_url: str) -> AsyncIterator[Ledger]:
    client = connect(redis_url)
    yield Ledger(client, url=redis_url)
    await client.aclose()
