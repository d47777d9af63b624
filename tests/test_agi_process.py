"""Process AGI (``prepaid-agi authorize``) over stdin/stdout: the same route, one process."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from prepaid.health import beat
from prepaid.ledger import Ledger
from prepaid.ratedeck import parse_csv
from prepaid.ratestore import RateStore
from testbed.agi_peer import (
    DENY_TAIL,
    GET_CALLER,
    NO_CREDIT_TAIL,
    AgiPeer,
    agi_env,
    variable_commands,
)
from tests.test_agi_fastagi import DECK

AGI_BIN = Path(sys.executable).parent / "prepaid-agi"


@pytest.fixture
async def conf(tmp_path: Path, redis_url: str, ledger: Ledger) -> Path:
    path = tmp_path / "prepaid.toml"
    path.write_text(f'[redis]\nurl = "{redis_url}"\n[agi]\ntimeout = 1.0\n'
                    'metering_stale_seconds = 3600.0\n')
    await RateStore(ledger.redis).replace(parse_csv(DECK))
    # A process AGI counts a missing heartbeat at once: one 'up' beat, good for the hour.
    await beat(ledger.redis, "prepaid", "", state="up", backlog=0, ttl=3600)
    return path


async def run_agi(conf: Path, peer: AgiPeer, *args: str, hup: bool = False) -> int:
    env = {**os.environ, "PREPAID_CONFIG": str(conf), "PREPAID_LOG_LEVEL": "WARNING"}
    proc = await asyncio.create_subprocess_exec(
        str(AGI_BIN), *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        env=env)
    if hup:
        peer.on_hangup = lambda: proc.send_signal(signal.SIGHUP)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        await peer.run(proc.stdout, proc.stdin, within=15)
        async with asyncio.timeout(15):
            return await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_process_agi_allows_with_the_same_variables(conf: Path, ledger: Ledger) -> None:
    await ledger.create_account("1001", currency="EUR")
    await ledger.credit("1001", 1_000_000, key="seed")
    peer = AgiPeer(agi_env("p1", "00491701234567", agi_request="prepaid-agi",
                           agi_network="no", agi_network_script="", agi_arg_1="authorize"))
    assert await run_agi(conf, peer, "authorize") == 0
    assert peer.commands == [GET_CALLER,
                             *variable_commands("ALLOWED", "", "1001", "p1", "900",
                                                "900000:60000")]
    assert await ledger.holds("1001") == {"call:p1": 160_000}


async def test_process_agi_number_argument_and_denial(conf: Path, ledger: Ledger) -> None:
    await ledger.create_account("1001", currency="EUR")
    peer = AgiPeer(agi_env("p2", "s", agi_arg_1="authorize", agi_arg_2="00491701234567"))
    assert await run_agi(conf, peer, "authorize", "00491701234567") == 0
    assert peer.commands[1:] == [*variable_commands("DENIED", "NO_CREDIT", "1001", "p2", "0",
                                                    ""), *NO_CREDIT_TAIL]


async def test_process_agi_sighup_releases_the_hold(conf: Path, ledger: Ledger) -> None:
    await ledger.create_account("1001", currency="EUR")
    await ledger.credit("1001", 1_000_000, key="seed")
    peer = AgiPeer(agi_env("p3", "00491701234567"), hangup_at="EXEC MSet")
    assert await run_agi(conf, peer, "authorize", hup=True) == 0
    assert peer.commands[-1].startswith("EXEC MSet PREPAID_STATUS=")
    assert await ledger.holds("1001") == {}
    assert (await ledger.get("1001")).available == 1_000_000


async def test_process_agi_bad_usage_exits_2(conf: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(AGI_BIN), "nonsense", stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 2 and b"usage: prepaid-agi" in err


async def test_process_agi_garbage_header_exits_1(conf: Path) -> None:
    env = {**os.environ, "PREPAID_CONFIG": str(conf)}
    proc = await asyncio.create_subprocess_exec(
        str(AGI_BIN), "authorize", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(b"garbage\n\n"), 15)
    assert proc.returncode == 1 and out == b""
    assert b"not 'agi_name: value'" in err


async def test_process_agi_without_a_heartbeat_refuses_at_once(conf: Path,
                                                               ledger: Ledger) -> None:
    # One process per call has no start to count a missing beat from: it counts at once.
    await ledger.redis.delete("prepaid:meter:-")
    await ledger.create_account("1001", currency="EUR")
    await ledger.credit("1001", 1_000_000, key="seed")
    peer = AgiPeer(agi_env("p9", "00491701234567"))
    assert await run_agi(conf, peer, "authorize") == 0
    assert peer.commands[1:] == [*variable_commands("ERROR", "NO_METERING", "1001", "p9", "0",
                                                    ""), *DENY_TAIL]
    assert await ledger.holds("1001") == {}
