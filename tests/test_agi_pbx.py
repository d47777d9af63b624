"""The shipped dialplan and AMI user in a real Asterisk 22, with the real FastAGI server."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agi.server import AgiServer
from prepaid.ratedeck import parse_csv
from prepaid.store import Store, open_store
from testbed.pbx import Pbx, pbx_unavailable_reason, start_pbx
from tests.conftest import cli
from tests.test_agi_fastagi import DECK, make_settings

pytestmark = pytest.mark.pbx


@pytest.fixture
async def served(redis_url: str) -> AsyncIterator[tuple[Store, AgiServer]]:
    reason = pbx_unavailable_reason()
    if reason:
        pytest.skip(reason)
    settings = make_settings(redis_url)
    settings = dataclasses.replace(settings, agi=dataclasses.replace(settings.agi, timeout=3.0))
    store = await open_store(settings)
    server = AgiServer(store, host="127.0.0.1", port=0)
    await server.start()
    await store.rates.replace(parse_csv(DECK))
    yield store, server
    await server.close()
    await store.close()


def sipp_call(pbx: Pbx, number: str, caller: str) -> None:
    res = pbx.sipp(["-sn", "uac", "-s", number, "-m", "1", "-d", "500", "-i", "127.0.0.1",
                    "-p", str(pbx.sipp_port), "-timeout", "20s",
                    "-timeout_error", f"127.0.0.1:{pbx.sip_port}"], 40)
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-1500:] + pbx.log_tail()


async def test_allowed_call_is_authorized_and_dialed_with_the_limit(
        served: tuple[Store, AgiServer]) -> None:
    store, server = served
    with start_pbx(agi_port=server.port) as pbx:
        assert "prepaid" in pbx.cli("manager show users")
        assert "TIMEOUT(absolute)=${PREPAID_TIMEOUT}" in pbx.cli(
            "dialplan show prepaid-outbound")
        # SIPp's uac calls as the endpoint 'sipp', whose accountcode is the account.
        await store.ledger.create_account("sipp", currency="EUR")
        await store.ledger.credit("sipp", 1_000_000, key="seed")
        # 0044...: the test bed's far end answers and hangs up after a few seconds.
        await asyncio.to_thread(sipp_call, pbx, "00447700900123", "sipp")
        assert server.served == 1
        [(hold, amount)] = (await store.ledger.holds("sipp")).items()
        assert hold.startswith("call:") and amount == 6_000  # UK: 30 s at 0.012/min
        # 1 EUR: 30 s for 0.006, then 828 blocks of 6 s for 0.0012: 4998 s, plus 60 s ringing.
        log = pbx.log_path.read_text(errors="replace")
        assert "TIMEOUT(absolute)=5058" in log
        assert "Dial(\"" in log and "Local/00447700900123,60" in log


@pytest.mark.parametrize("dialplan_secret", ["right", "wrong"])
async def test_the_shipped_dialplan_passes_the_agi_secret(redis_url: str,
                                                          dialplan_secret: str) -> None:
    reason = pbx_unavailable_reason()
    if reason:
        pytest.skip(reason)
    secret = "pbx-agi-secret-7f3a"
    settings = make_settings(redis_url, timeout=3.0, secret=secret)
    store = await open_store(settings)
    server = AgiServer(store, host="127.0.0.1", port=0)
    await server.start()
    try:
        await store.rates.replace(parse_csv(DECK))
        await store.ledger.create_account("sipp", currency="EUR")
        await store.ledger.credit("sipp", 1_000_000, key="seed")
        given = secret if dialplan_secret == "right" else "not-" + secret
        with start_pbx(agi_port=server.port, agi_secret=given) as pbx:
            if dialplan_secret == "right":
                await asyncio.to_thread(sipp_call, pbx, "00447700900123", "sipp")
            else:  # the call is refused: SIPp's uac scenario may not end as it expects
                await asyncio.to_thread(pbx.sipp, [
                    "-sn", "uac", "-s", "00447700900123", "-m", "1", "-d", "500", "-i",
                    "127.0.0.1", "-p", str(pbx.sipp_port), "-timeout", "10s",
                    f"127.0.0.1:{pbx.sip_port}"], 30)
            log = pbx.log_path.read_text(errors="replace")
        holds = await store.ledger.holds("sipp")
        if dialplan_secret == "right":
            assert server.served == 1 and len(holds) == 1
            assert "Local/00447700900123,60" in log
        else:  # refused before any AGI command: never dialed, nothing held
            assert (server.served, server.rejected, holds) == (0, 1, {})
            assert "Local/00447700900123" not in log
            assert "prepaid/call-cannot-be-completed" in log
    finally:
        await server.close()
        await store.close()


async def test_a_refused_call_shows_in_calls_refused_with_its_asterisk(
        served: tuple[Store, AgiServer], tmp_path: Path, redis_url: str) -> None:
    """Why was this call refused? Asterisk 22 (systemname pbx-a) asks, the account has no
    credit: `prepaid calls sipp --refused` names the number, the reason and the server."""
    store, server = served
    await store.ledger.create_account("sipp", currency="EUR")
    with start_pbx(agi_port=server.port, system_name="pbx-a") as pbx:
        # Refused: SIPp's uac scenario may not end as it expects.
        await asyncio.to_thread(pbx.sipp, [
            "-sn", "uac", "-s", "00447700900123", "-m", "1", "-d", "500", "-i", "127.0.0.1",
            "-p", str(pbx.sipp_port), "-timeout", "10s", f"127.0.0.1:{pbx.sip_port}"], 30)
        log = pbx.log_path.read_text(errors="replace")
    assert server.served == 1 and "prepaid/balance-too-low" in log
    await server.context.drain()
    conf = tmp_path / "prepaid.toml"
    conf.write_text(f'[redis]\nurl = "{redis_url}"\n')
    out = await asyncio.to_thread(cli(conf), "calls", "sipp", "--refused", "--json")
    assert out.exit_code == 0, out.output
    [refused] = json.loads(out.stdout)["outcomes"]
    assert (refused["number"], refused["status"], refused["reason"], refused["server"]) == (
        "00447700900123", "DENIED", "NO_CREDIT", "pbx-a")
    assert refused["ref"].startswith("pbx-a-") and refused["ref"] in log
