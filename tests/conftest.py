from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

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
