"""FastAGI authorization driven over TCP exactly as Asterisk does, against a real Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agi.server import AgiServer
from prepaid import config
from prepaid.callrecord import record_key
from prepaid.config import Settings
from prepaid.ratedeck import parse_csv
from prepaid.store import Store, open_store
from testbed.agi_peer import (
    DENY_TAIL,
    GET_CALLER,
    NO_CREDIT_TAIL,
    AgiPeer,
    agi_env,
    variable_commands,
)
from testbed.replies import fields
from testbed.servers import RedisServer

EUR = 1_000_000
DECK = """prefix,name,price_per_minute,connect_fee,initial_increment,increment
49,Germany,0.06,0.10,60,60
44,United Kingdom,0.012,0,30,6
"""
GET_ACCOUNT = "GET VARIABLE PREPAID_ACCOUNT"  # the balance route


def make_settings(redis_url: str, **agi: Any) -> Settings:  # AgiSettings fields, any type
    base = config.parse({"redis": {"url": redis_url, "timeout": 0.5}}, "<test>", env={})
    # No metering listener runs here: a missing heartbeat counts only after an hour, so
    # these tests see authorization alone (tests/test_agi_metering.py tests the gate).
    agi = {"timeout": 1.0, "metering_stale_seconds": 3600.0, **agi}
    return dataclasses.replace(base, agi=dataclasses.replace(base.agi, **agi))


async def start(settings: Settings, **kw: float) -> tuple[Store, AgiServer]:
    store = await open_store(settings)
    server = AgiServer(store, host="127.0.0.1", port=0, **kw)  # type: ignore[arg-type]
    await server.start()
    return store, server


@pytest.fixture
async def agi(redis_url: str) -> AsyncIterator[tuple[Store, AgiServer]]:
    store, server = await start(make_settings(redis_url))
    await store.rates.replace(parse_csv(DECK))
    yield store, server
    await server.close()
    await store.close()


async def account(store: Store, ident: str, balance: int, **kw: object) -> None:
    await store.ledger.create_account(ident, currency="EUR", **kw)  # type: ignore[arg-type]
    if balance:
        await store.ledger.credit(ident, balance, key=f"seed:{ident}")


async def test_enough_credit_sets_the_contract_variables_and_reserves_block_one(
        agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    await account(store, "1001", EUR)
    peer = AgiPeer(agi_env("1700000000.1", "00491701234567", callerid="1001"),
                   variables={"CHANNEL(linkedid)": "1700000000.1"})
    commands = await peer.call(server.port)
    # 1 EUR = connect 0.10 + 15 minutes at 0.06: 900 s, warning one minute before the end.
    assert commands == [GET_CALLER, *variable_commands(
        "ALLOWED", "", "1001", "1700000000.1", "900", "900000:60000")]
    assert await store.ledger.holds("1001") == {"call:1700000000.1": 160_000}
    acct = await store.ledger.get("1001")
    assert (acct.balance, acct.held) == (EUR, 160_000)
    record = fields(await store.redis.hgetall("prepaid:callref:1700000000.1"))
    assert record["account"] == "1001" and record["number"] == "00491701234567"
    assert record["digits"] == "491701234567" and record["hold"] == "160000"
    assert record["max_seconds"] == "900" and record["state"] == "authorized"
    assert record["channel"] == "PJSIP/1001-00000001" and record["uniqueid"] == "1700000000.1"
    assert record["linkedid"] == "1700000000.1"
    assert '"per_minute": 60000' in record["rate"]
    ttl = await store.redis.ttl("prepaid:callref:1700000000.1")
    assert 900 + 3600 - 5 <= ttl <= 900 + 3600


async def test_not_enough_credit_plays_balance_too_low_and_hangs_up(
        agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    await account(store, "1001", 159_999)
    peer = AgiPeer(agi_env("1700000000.2", "00491701234567", callerid="1001"))
    commands = await peer.call(server.port)
    assert commands == [GET_CALLER, *variable_commands(
        "DENIED", "NO_CREDIT", "1001", "1700000000.2", "0", ""), *NO_CREDIT_TAIL]
    assert await store.ledger.holds("1001") == {}
    assert (await store.ledger.get("1001")).balance == 159_999


async def test_exactly_one_increment_allows_sixty_seconds_without_a_warning(
        agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    await account(store, "1001", 160_000)
    commands = await AgiPeer(agi_env("r3", "00491701234567")).call(server.port)
    assert commands[1:] == variable_commands("ALLOWED", "", "1001", "r3", "60", "60000:0")
    assert await store.ledger.holds("1001") == {"call:r3": 160_000}
    assert (await store.ledger.get("1001")).available == 0


async def test_other_live_calls_holds_shorten_the_call(agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    await account(store, "1001", EUR)
    await store.ledger.reserve("1001", "call:other", 500_000, key="auth:other")
    peer = AgiPeer(agi_env("r4", "00491701234567"))
    await peer.call(server.port)
    # 0.50 left: connect 0.10 + 6 minutes.
    assert peer.set_vars["PREPAID_MAX_SECONDS"] == "360"
    assert peer.set_vars["PREPAID_DIAL_LIMIT"] == "360000:60000"


async def test_uk_rate_with_six_second_increments(agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    await account(store, "1001", 10_000)  # 30 s = 0.006, then 6 s = 0.0012 each: 3 more
    peer = AgiPeer(agi_env("r5", "+447700900123"))
    await peer.call(server.port)
    assert peer.set_vars["PREPAID_MAX_SECONDS"] == "48"
    assert await store.ledger.holds("1001") == {"call:r5": 6_000}


async def test_two_calls_racing_the_last_credit_exactly_one_is_allowed(
        agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    await account(store, "1001", 200_000)  # one first block (0.16), not two
    peers = [AgiPeer(agi_env(f"race{i}", "00491701234567")) for i in range(2)]
    await asyncio.gather(*(p.call(server.port) for p in peers))
    statuses = sorted(p.set_vars["PREPAID_STATUS"] for p in peers)
    assert statuses == ["ALLOWED", "DENIED"]
    denied = next(p for p in peers if p.set_vars["PREPAID_STATUS"] == "DENIED")
    assert denied.set_vars["PREPAID_REASON"] == "NO_CREDIT"
    holds = await store.ledger.holds("1001")
    assert list(holds.values()) == [160_000]


async def test_unknown_account_is_refused_with_its_prompt(agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    commands = await AgiPeer(agi_env("r6", "00491701234567", callerid="9999")).call(server.port)
    assert commands == [GET_CALLER, *variable_commands(
        "DENIED", "UNKNOWN_ACCOUNT", "9999", "r6", "0", ""), *DENY_TAIL]


async def test_caller_without_any_account_source_is_unknown(
        agi: tuple[Store, AgiServer]) -> None:
    _, server = agi
    peer = AgiPeer(agi_env("r6b", "00491701234567", callerid=""))
    await peer.call(server.port)
    assert (peer.set_vars["PREPAID_STATUS"], peer.set_vars["PREPAID_REASON"]) == (
        "DENIED", "UNKNOWN_ACCOUNT")


async def test_suspended_account_is_refused_and_nothing_reserved(
        agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    await account(store, "1001", EUR)
    await store.ledger.update("1001", status="suspended")
    commands = await AgiPeer(agi_env("r7", "00491701234567")).call(server.port)
    assert commands[1:] == [*variable_commands("DENIED", "SUSPENDED", "1001", "r7", "0", ""),
                            *DENY_TAIL]
    assert await store.ledger.holds("1001") == {}


@pytest.mark.parametrize("number", ["0033123456", "not-a-number"])
async def test_number_without_rate_is_refused(agi: tuple[Store, AgiServer], number: str) -> None:
    store, server = agi
    await account(store, "1001", EUR)
    commands = await AgiPeer(agi_env("r8", number)).call(server.port)
    assert commands[1:] == [*variable_commands("DENIED", "NO_RATE", "1001", "r8", "0", ""),
                            *DENY_TAIL]
    assert await store.ledger.holds("1001") == {}


async def test_agi_argument_overrides_the_extension(agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    await account(store, "1001", EUR)
    # AGI(${PREPAID_AGI}/authorize,${PREPAID_AGI_SECRET},<number>): the secret comes first.
    peer = AgiPeer(agi_env("r9", "s", agi_arg_1="", agi_arg_2="00491701234567"))
    await peer.call(server.port)
    assert peer.set_vars["PREPAID_STATUS"] == "ALLOWED"


async def test_account_variable_wins_over_accountcode_and_callerid(
        agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    await account(store, "acct-a", EUR)
    await account(store, "acct-b", EUR)
    peer = AgiPeer(agi_env("r10", "00491701234567", callerid="1001", accountcode="acct-b"),
                   variables={"PREPAID_ACCOUNT": "acct-a"})
    await peer.call(server.port)
    assert peer.set_vars["PREPAID_ACCOUNT"] == "acct-a"
    peer = AgiPeer(agi_env("r11", "00491701234567", callerid="1001", accountcode="acct-b"))
    await peer.call(server.port)
    assert peer.set_vars["PREPAID_ACCOUNT"] == "acct-b"
    assert set(await store.ledger.holds("acct-a")) == {"call:r10"}
    assert set(await store.ledger.holds("acct-b")) == {"call:r11"}


async def test_account_sources_order_is_configurable(redis_url: str) -> None:
    store, server = await start(make_settings(redis_url, account_sources=("callerid",)))
    try:
        await store.rates.replace(parse_csv(DECK))
        await account(store, "1001", EUR)
        peer = AgiPeer(agi_env("r12", "00491701234567", callerid="1001", accountcode="x"),
                       variables={"PREPAID_ACCOUNT": "x"})
        commands = await peer.call(server.port)
        assert commands[0] == 'GET FULL VARIABLE "${CHANNEL(linkedid)}"'  # no variable asked
        assert peer.set_vars["PREPAID_ACCOUNT"] == "1001"
    finally:
        await server.close()
        await store.close()


async def test_low_balance_sets_the_flag_for_the_dialplan(agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    await account(store, "1001", EUR, threshold=5 * EUR, action="email")
    peer = AgiPeer(agi_env("r13", "00491701234567"))
    await peer.call(server.port)
    assert peer.set_vars["PREPAID_LOW_BALANCE"] == "1"
    assert "ANSWER" not in peer.commands  # the call is not answered by the AGI


async def test_hangup_on_deny_off_hands_back_to_the_dialplan(redis_url: str) -> None:
    store, server = await start(make_settings(redis_url, hangup_on_deny=False))
    try:
        await store.rates.replace(parse_csv(DECK))
        await account(store, "1001", 0)
        commands = await AgiPeer(agi_env("r14", "00491701234567")).call(server.port)
        assert commands == [GET_CALLER, *variable_commands(
            "DENIED", "NO_CREDIT", "1001", "r14", "0", "")]
    finally:
        await server.close()
        await store.close()


async def test_caller_hanging_up_before_authorization_reserves_nothing(
        agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    await account(store, "1001", EUR)
    peer = AgiPeer(agi_env("r15", "00491701234567"), hangup_at="GET FULL VARIABLE")
    assert await peer.call(server.port) == [GET_CALLER]
    acct = await store.ledger.get("1001")
    assert (acct.balance, acct.held) == (EUR, 0)
    assert "reserve" not in [e.kind for e in await store.ledger.history("1001")]


async def test_caller_hanging_up_during_authorization_releases_the_hold(
        agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    await account(store, "1001", EUR)
    peer = AgiPeer(agi_env("r15", "00491701234567"), hangup_at="EXEC MSet")
    commands = await peer.call(server.port)
    assert commands[-1].startswith("EXEC MSet")  # nothing sent after the HANGUP
    assert await store.ledger.holds("1001") == {}
    acct = await store.ledger.get("1001")
    assert (acct.balance, acct.held) == (EUR, 0)
    [entry, *_] = await store.ledger.history("1001")
    assert entry.kind == "release"


async def test_redis_outage_denies_within_the_timeout_and_logs_once(
        agi: tuple[Store, AgiServer], redis_server: RedisServer,
        caplog: pytest.LogCaptureFixture) -> None:
    store, server = agi
    await account(store, "1001", EUR)
    caplog.set_level(logging.DEBUG, logger="agi")
    redis_server.stop()
    try:
        for i in range(3):
            began = time.monotonic()
            peer = AgiPeer(agi_env(f"down{i}", "00491701234567"))
            commands = await peer.call(server.port)
            assert time.monotonic() - began < store.settings.agi.timeout + 1.0
            assert commands[1:] == [*variable_commands(
                "ERROR", "INTERNAL", "1001", f"down{i}", "0", ""), *DENY_TAIL]
    finally:
        redis_server.start()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "unavailable" in errors[0].getMessage()
    # Back up (empty: the test Redis keeps nothing): the next call is served and logged.
    await store.rates.replace(parse_csv(DECK))
    await account(store, "1001", EUR)
    peer = AgiPeer(agi_env("up", "00491701234567"))
    await peer.call(server.port)
    assert peer.set_vars["PREPAID_STATUS"] == "ALLOWED"
    assert any("recovered" in r.getMessage() and r.levelno == logging.INFO
               for r in caplog.records)


async def test_fail_open_lets_the_call_through_with_the_cap(
        redis_url: str, redis_server: RedisServer) -> None:
    store, server = await start(make_settings(redis_url, fail_open=True))
    redis_server.stop()
    try:
        peer = AgiPeer(agi_env("open1", "00491701234567", callerid="1001"))
        commands = await peer.call(server.port)
        assert commands[1:] == variable_commands("ALLOWED", "FAIL_OPEN", "1001", "open1",
                                                 "10800", "10800000:60000")
    finally:
        redis_server.start()
        await server.close()
        await store.close()


async def test_no_rate_deck_is_an_internal_error(redis_url: str) -> None:
    store, server = await start(make_settings(redis_url))
    try:
        await account(store, "1001", EUR)
        peer = AgiPeer(agi_env("nodeck", "00491701234567"))
        await peer.call(server.port)
        assert (peer.set_vars["PREPAID_STATUS"], peer.set_vars["PREPAID_REASON"]) == (
            "ERROR", "INTERNAL")
    finally:
        await server.close()
        await store.close()


async def test_balance_route_says_units_currency_and_cents(
        agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    await account(store, "1001", 9_504_321)
    peer = AgiPeer(agi_env("b1", "*100", script="balance"))
    commands = await peer.call(server.port)
    assert commands == [GET_ACCOUNT, "ANSWER", 'STREAM FILE prepaid/your-balance-is ""',
                        'SAY NUMBER 9 ""', 'STREAM FILE prepaid/currency-eur ""',
                        'STREAM FILE prepaid/and ""', 'SAY NUMBER 50 ""',
                        'STREAM FILE prepaid/cents ""']


async def test_balance_route_for_an_unknown_caller(agi: tuple[Store, AgiServer]) -> None:
    _, server = agi
    commands = await AgiPeer(agi_env("b2", "*100", callerid="77", script="balance")).call(
        server.port)
    assert commands == [GET_ACCOUNT, "ANSWER", 'STREAM FILE prepaid/account-unknown ""']


async def test_unknown_route_sends_nothing(agi: tuple[Store, AgiServer]) -> None:
    _, server = agi
    peer = AgiPeer(agi_env("u1", "123", script="nonsense"))
    assert await peer.call(server.port) == []
    assert peer.closed_by_server


async def test_a_live_call_transferred_back_into_the_context_is_not_authorized_again(
        agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    await account(store, "1001", EUR)
    first = AgiPeer(agi_env("r-live", "00491701234567"))
    await first.call(server.port)
    assert first.set_vars["PREPAID_STATUS"] == "ALLOWED"
    key = "prepaid:callref:r-live"
    await store.redis.hset(key, mapping={"state": "answered", "blocks_paid": "2"})
    again = AgiPeer(agi_env("r-live", "00441234567890"))  # same channel, new destination
    commands = await again.call(server.port)
    assert (again.set_vars["PREPAID_STATUS"], again.set_vars["PREPAID_REASON"]) == (
        "DENIED", "IN_CALL")
    assert commands[-3:] == DENY_TAIL
    assert await store.ledger.holds("1001") == {"call:r-live": 160_000}  # one hold, kept
    record = await store.redis.hgetall(key)
    assert (record[b"state"], record[b"blocks_paid"], record[b"number"]) == (
        b"answered", b"2", b"00491701234567")  # the live call's record is untouched


async def test_while_an_authorization_is_slow_new_calls_are_refused_at_once(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agi")
    store, server = await start(make_settings(redis_url, busy_seconds=0.2))
    try:
        await store.rates.replace(parse_csv(DECK))
        await account(store, "1001", EUR)
        # Call one is being authorized: Asterisk has not answered its first command for
        # longer than busy_seconds.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        env = agi_env("slow", "00491701234567")
        writer.write(("".join(f"{k}: {v}\n" for k, v in env.items()) + "\n").encode())
        async with asyncio.timeout(3):
            assert await reader.readline() == (GET_CALLER + "\n").encode()
            await asyncio.sleep(0.3)  # the condition under test: 0.3 s > busy_seconds
            # Call two: refused with one command, no prompt, nothing held, no call record.
            peer = AgiPeer(agi_env("busy1", "00491701234567"))
            assert await peer.call(server.port) == variable_commands(
                "ERROR", "BUSY", "", "busy1", "0", "")
            assert peer.closed_by_server
            assert await store.ledger.holds("1001") == {}
            assert not await store.redis.exists(record_key("prepaid", "busy1"))
            # Call one goes on and is allowed; then call three is served again.
            writer.write(b"200 result=1 (slow/)\n")
            assert (await reader.readline()).startswith(b"EXEC MSet PREPAID_STATUS=ALLOWED,")
            writer.write(b"200 result=0\n")
            assert await reader.read() == b""
        writer.close()
        peer = AgiPeer(agi_env("after", "00491701234567"))
        await peer.call(server.port)
        assert peer.set_vars["PREPAID_STATUS"] == "ALLOWED"
        assert set(await store.ledger.holds("1001")) == {"call:slow", "call:after"}
    finally:
        await server.close()
        await store.close()
    said = [r.getMessage() for r in caplog.records if "BUSY" in r.getMessage()
            and r.name == "agi.routes" and "call busy1" not in r.getMessage()]
    assert [m.split(" s (")[1] if " s (" in m else m for m in said] == [
        "[agi] busy_seconds 0.2), 1 in progress: new calls are refused (ERROR BUSY) until "
        "they are quicker", "authorizing again: 1 call(s) were refused BUSY"]


async def test_a_server_short_of_cpu_refuses_busy_and_does_not_blame_redis(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agi")
    store, server = await start(make_settings(redis_url, timeout=1.0))
    await store.rates.replace(parse_csv(DECK))
    await account(store, "1001", EUR)

    async def hog() -> None:  # a neighbour that takes the CPU: 0.3 s in every loop turn
        while True:
            time.sleep(0.3)  # noqa: ASYNC251 - blocking the loop is the fault under test
            await asyncio.sleep(0)

    hogging = asyncio.create_task(hog())
    try:
        peer = AgiPeer(agi_env("starved", "00491701234567"))
        commands = await peer.call(server.port, within=30)
    finally:
        hogging.cancel()
        await asyncio.gather(hogging, return_exceptions=True)
    try:
        # Refused, without a prompt from the AGI (the dialplan plays it), nothing held.
        assert commands == [GET_CALLER, *variable_commands("ERROR", "BUSY", "1001", "starved",
                                                           "0", "")]
        account_now = await store.ledger.get("1001")
        assert (account_now.balance, account_now.held) == (EUR, 0)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "event loop ran" in errors[0], errors
        assert "Redis is not to blame" in errors[0]
        # The CPU is back: the next call is allowed, and the recovery is said once.
        peer = AgiPeer(agi_env("fed", "00491701234567"))
        await peer.call(server.port)
        assert peer.set_vars["PREPAID_STATUS"] == "ALLOWED"
        assert [r for r in caplog.records if "recovered" in r.getMessage()]
    finally:
        await server.close()
        await store.close()


async def test_a_free_destination_is_allowed_for_the_longest_call_with_a_zero_hold(
        agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    await store.rates.replace(parse_csv(DECK + "800,Freephone,0,0,60,60\n"))
    await account(store, "1001", 0)  # no credit at all: a free call still goes through
    peer = AgiPeer(agi_env("1700000000.9", "800123456", callerid="1001"),
                   variables={"CHANNEL(linkedid)": "1700000000.9"})
    commands = await peer.call(server.port)
    longest = store.settings.billing.max_call_seconds
    assert commands == [GET_CALLER, *variable_commands(
        "ALLOWED", "", "1001", "1700000000.9", str(longest), f"{longest * 1000}:60000")]
    assert await store.ledger.holds("1001") == {"call:1700000000.9": 0}
