from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from prepaid.audit import Audit
from prepaid.ledger import Ledger
from prepaid.redis_client import connect
from shell.cli import main
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


Run = Callable[..., Result]


def cli(conf: Path) -> Run:
    """The `prepaid` CLI with ``--config conf``, in-process (click's runner)."""
    def invoke(*args: str) -> Result:
        return CliRunner().invoke(main, ["--config", str(conf), *args], catch_exceptions=False)
    return invoke


@pytest.fixture
def run(redis_url: str, tmp_path: Path) -> Run:
    conf = tmp_path / "prepaid.toml"
    conf.write_text(f'[redis]\nurl = "{redis_url}"\n[billing]\ncurrency = "EUR"\n'
                    '[policy]\nmax_topup = "100"\n')
    return cli(conf)


async def assert_verified(target: str | Ledger, account: str | None = None, *,
                          prefix: str = "prepaid", grace: float = 1.0) -> None:
    """``prepaid verify`` finds nothing on this Redis (a URL) or ledger: called at the end
    of every storm and fault scenario (issue 13), so none leaves a balance off its history,
    a hold without its call, a call charged other than its rate or a key applied twice."""
    if isinstance(target, str):
        client = connect(target, timeout=10)
        try:
            await assert_verified(Ledger(client, prefix, target), account, grace=grace)
        finally:
            await client.aclose()
        return
    found = [m async for m in Audit(target, grace=grace).run(account)]
    assert not found, "prepaid verify after the scenario: " + "; ".join(
        f"{m.account}: {m.kind}: {m.detail}" for m in found[:20])
