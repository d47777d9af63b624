"""FastAGI faults: garbage and stalled peers next to real calls (6), a 10x burst (7)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agi.server import AgiServer
from prepaid.ratedeck import parse_csv
from prepaid.rating import block_cost
from prepaid.store import Store, open_store
from testbed.agi_peer import AgiPeer, agi_env
from testbed.ami_peer import wait_until
from tests.conftest import assert_verified
from tests.faults.conftest import cli_async, lines, settings

DECK = """prefix,name,price_per_minute,connect_fee,initial_increment,increment
49,Germany,0.06,0.10,60,60
"""
BLOCK = 160_000  # Germany: connect 0.10 + the first minute at 0.06
NUMBER = "00491701234567"


async def start(redis_url: str, **agi: object) -> tuple[Store, AgiServer]:
    # No metering listener here: a missing heartbeat counts only after an hour.
    store = await open_store(settings(redis_url, agi={"metering_stale_seconds": 3600.0, **agi}))
    server = AgiServer(store, host="127.0.0.1", port=0)
    await server.start()
    await store.rates.replace(parse_csv(DECK))
    rate = (await store.rates.current()).lookup(NUMBER, store.settings.billing.normalisation)
    assert block_cost(rate, 1) == BLOCK
    return store, server


@pytest.fixture
async def stack(redis_url: str) -> AsyncIterator[tuple[Store, AgiServer]]:
    store, server = await start(redis_url, timeout=1.0, header_timeout=0.5,
                                max_connections=1000)
    yield store, server
    await server.close()
    await store.close()


async def timed_call(port: int, uid: str, account: str, within: float) -> tuple[AgiPeer, float]:
    peer = AgiPeer(agi_env(uid, NUMBER, callerid=account))
    began = time.monotonic()
    try:
        await peer.call(port, within=within)
    except ConnectionResetError:  # closed by the server before it read our header
        peer.closed_by_server = True
    return peer, time.monotonic() - began


async def _now(value: bool) -> bool:
    return value


class Bad:
    """A misbehaving FastAGI client; ``closed_after`` is when the server hung up on it."""

    def __init__(self, kind: str, port: int) -> None:
        self.kind, self.port = kind, port
        self.closed_after: float | None = None

    async def run(self, limit: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        began = time.monotonic()
        try:
            if self.kind == "stall":  # half a header, then silence
                writer.write(b"agi_network: yes\nagi_network_script: authorize\nagi_chan")
            elif self.kind == "garbage":
                writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
            elif self.kind == "http":
                writer.write(b"GET /authorize HTTP/1.1\r\nHost: pbx\r\n\r\n")
            await writer.drain()
            async with asyncio.timeout(limit):
                if self.kind == "dribble":  # a valid header line every 50 ms, never the end
                    n = 0
                    while not reader.at_eof():
                        writer.write(b"agi_x%d: y\n" % n)
                        n += 1
                        await writer.drain()
                        try:
                            async with asyncio.timeout(0.05):
                                await reader.read()
                        except TimeoutError:
                            continue
                else:
                    await reader.read()  # until the server closes
            self.closed_after = time.monotonic() - began
        except (ConnectionError, OSError):
            self.closed_after = time.monotonic() - began
        finally:
            writer.close()


async def test_garbage_and_stalled_clients_do_not_delay_real_authorizations(
        stack: tuple[Store, AgiServer], caplog: pytest.LogCaptureFixture) -> None:
    """Fault 6: 40 misbehaving connections (half-headers left hanging, TLS/HTTP garbage,
    a header dribbled forever) while 40 real calls authorize: every real call is ALLOWED
    within the [agi] timeout, every bad connection is closed by [agi] header_timeout."""
    caplog.set_level(logging.INFO, logger="agi")
    store, server = stack
    await store.ledger.create_account("1001", currency="EUR")
    await store.ledger.credit("1001", 40 * BLOCK, key="seed")
    kinds = ["stall"] * 25 + ["garbage"] * 5 + ["http"] * 5 + ["dribble"] * 5
    bad = [Bad(kind, server.port) for kind in kinds]
    bad_tasks = [asyncio.create_task(b.run(limit=3.0)) for b in bad]
    try:
        await asyncio.sleep(0)  # the bad ones connect first
        real = await asyncio.gather(*(timed_call(server.port, f"good{i}", "1001", within=3.0)
                                      for i in range(40)))
    finally:
        await asyncio.gather(*bad_tasks)
    statuses = {p.set_vars.get("PREPAID_STATUS") for p, _ in real}
    assert statuses == {"ALLOWED"}
    slowest = max(seconds for _, seconds in real)
    assert slowest < 1.0, f"slowest real authorization took {slowest:.3f} s"
    # Every bad connection was closed by the server, none later than the header timeout.
    for b in bad:
        assert b.closed_after is not None and b.closed_after < 0.5 + 0.5, (b.kind, b.closed_after)
    assert server.rejected == 40 and server.served == 40
    holds = await store.ledger.holds("1001")
    assert len(holds) == 40 and sum(holds.values()) == 40 * BLOCK
    # What the admin sees: one warning per bad connection, naming the peer and why.
    dropped = lines(caplog, "dropped:", logger="agi.server", level=logging.WARNING)
    assert len(dropped) == 40
    assert any("timed out" in d or "within" in d for d in dropped), dropped[:3]
    assert not lines(caplog, "", logger="agi", level=logging.ERROR)
    await assert_verified(store.ledger)


async def test_stalled_clients_holding_every_slot_refuse_calls_until_the_header_timeout(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Fault 6, the limit: stallers that fill [agi] max_connections make the server refuse
    real calls (closed without a word: the dialplan sees AGISTATUS=FAILURE) until the header
    timeout frees the slots.  Lost: those calls' authorizations; nothing else."""
    caplog.set_level(logging.INFO, logger="agi")
    store, server = await start(redis_url, timeout=1.0, header_timeout=0.5, max_connections=10)
    try:
        await store.ledger.create_account("1001", currency="EUR")
        await store.ledger.credit("1001", 10 * BLOCK, key="seed")
        stallers = [Bad("stall", server.port) for _ in range(10)]
        tasks = [asyncio.create_task(s.run(limit=3.0)) for s in stallers]
        try:
            await wait_until(lambda: _now(len(server._tasks) >= 10), within=2.0,
                             what="all ten slots taken")
            refused, _ = await timed_call(server.port, "refused", "1001", within=2.0)
            assert refused.closed_by_server and refused.commands == []
            assert lines(caplog, "refused: 10 connections open", logger="agi.server",
                         level=logging.WARNING)
        finally:
            await asyncio.gather(*tasks)
        served, seconds = await timed_call(server.port, "after", "1001", within=2.0)
        assert served.set_vars["PREPAID_STATUS"] == "ALLOWED" and seconds < 1.0
        assert await store.ledger.holds("1001") == {"call:after": BLOCK}
        await assert_verified(store.ledger)
    finally:
        await server.close()
        await store.close()


async def test_a_10x_burst_of_200_calls_for_20_accounts_never_over_reserves(
        redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Fault 7: 200 concurrent FastAGI authorizations, 10 per account, for 20 accounts
    whose credit pays five first blocks each: all 200 answered within the [agi] timeout,
    exactly five ALLOWED and five DENIED NO_CREDIT per account, the holds never exceed the
    balance, and each account's history sums to its balance."""
    caplog.set_level(logging.INFO, logger="agi")
    store, server = await start(redis_url, timeout=3.0)
    try:
        accounts = [f"20{n:02d}" for n in range(20)]
        balance = 5 * BLOCK + 50_000  # five first blocks and 0.05 over: not a sixth
        for acct in accounts:
            await store.ledger.create_account(acct, currency="EUR")
            await store.ledger.credit(acct, balance, key=f"seed:{acct}")
        attempts = [(acct, f"burst-{acct}-{i}") for i in range(10) for acct in accounts]
        began = time.monotonic()
        results = await asyncio.gather(*(timed_call(server.port, uid, acct, within=10.0)
                                         for acct, uid in attempts))
        wall = time.monotonic() - began
        slowest = max(seconds for _, seconds in results)
        assert slowest < 3.0, f"slowest of 200 took {slowest:.3f} s (burst {wall:.3f} s)"
        per: dict[str, list[str]] = {a: [] for a in accounts}
        for (acct, _), (peer, _) in zip(attempts, results, strict=True):
            per[acct].append(peer.set_vars["PREPAID_STATUS"] + ":" +
                             peer.set_vars["PREPAID_REASON"])
        for acct, outcomes in per.items():
            # Exactly five calls got the credit; every other one was refused for want of it.
            assert outcomes.count("ALLOWED:") == 5, (acct, outcomes)
            assert set(outcomes) == {"ALLOWED:", "DENIED:NO_CREDIT"}, (acct, outcomes)
            account = await store.ledger.get(acct)
            holds = await store.ledger.holds(acct)
            assert len(holds) == 5
            assert sum(holds.values()) == account.held == 5 * BLOCK <= account.balance
            assert account.balance == balance
            history = await store.ledger.history(acct, 1000)
            assert sum(e.amount for e in history) == account.balance
        assert not lines(caplog, "", logger="agi", level=logging.WARNING)
        assert server.served == 200 and server.rejected == 0
        # What the admin sees for one of them.
        shown = await cli_async(redis_url, tmp_path, "balance", "2000")
        assert shown.output.strip() == (
            "2000: EUR 0.85 (EUR 0.80 held for live calls, EUR 0.05 available)")
        await assert_verified(store.ledger)
    finally:
        await server.close()
        await store.close()



async def test_150_concurrent_ledger_steps_on_one_service_client_all_succeed(
        redis_url: str) -> None:
    store = await open_store(settings(redis_url))
    try:
        await store.ledger.create_account("1001", currency="EUR")
        await store.ledger.credit("1001", 150 * BLOCK, key="seed")
        await asyncio.gather(*(store.ledger.reserve("1001", f"call:p{i}", BLOCK,
                                                    key=f"auth:p{i}") for i in range(150)))
        assert (await store.ledger.get("1001")).held == 150 * BLOCK
    finally:
        await store.close()
