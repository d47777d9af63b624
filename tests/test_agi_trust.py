"""Who may authorize and who pays (issue 11, parts 2 and 3): FastAGI over TCP in the real
wire format, against a real Redis."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from agi.server import AgiServer
from prepaid import config
from prepaid.callrecord import record_key
from prepaid.errors import ConfigError
from prepaid.ratedeck import parse_csv
from prepaid.store import Store, open_store
from testbed.agi_peer import AgiPeer, agi_env
from tests.test_agi_fastagi import DECK, EUR, account, make_settings, start


@pytest.fixture
async def served(redis_url: str) -> AsyncIterator[tuple[Store, AgiServer]]:
    store, server = await start(make_settings(redis_url))
    await store.rates.replace(parse_csv(DECK))
    yield store, server
    await server.close()
    await store.close()


def host_address() -> str | None:
    """This host's address on its default route (not loopback), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route
        except OSError:
            return None
        address = str(s.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_the_default_allow_is_loopback_only_and_empty_is_refused() -> None:
    agi = config.parse({}, "<test>", env={}).agi
    assert agi.allow == ("127.0.0.0/8", "::1")
    with pytest.raises(ConfigError, match=r"\[agi\] allow is empty"):
        config.parse({"agi": {"allow": []}}, "<test>", env={})


async def test_a_client_off_loopback_is_refused_by_default(redis_url: str) -> None:
    address = host_address()
    if address is None:
        pytest.skip("this host has no address besides loopback")
    store = await open_store(make_settings(redis_url))
    server = AgiServer(store, host="0.0.0.0", port=0)
    await server.start()
    try:
        await store.rates.replace(parse_csv(DECK))
        await account(store, "1001", EUR)
        far = AgiPeer(agi_env("far1"))
        try:
            assert await far.call(server.port, host=address) == []
        except ConnectionResetError:
            pass  # closed with the header unread: the kernel resets the link
        assert far.commands == [] and server.rejected == 1
        near = AgiPeer(agi_env("near1"))
        await near.call(server.port)
        assert near.set_vars["PREPAID_STATUS"] == "ALLOWED"
    finally:
        await server.close()
        await store.close()


async def test_callerid_is_not_a_default_source(served: tuple[Store, AgiServer]) -> None:
    store, server = served
    await account(store, "1001", EUR)
    # A caller who sends From: 1001 on an endpoint without an accountcode pays nothing.
    peer = AgiPeer(agi_env("cid1", callerid="1001", accountcode=""))
    await peer.call(server.port)
    assert (peer.set_vars["PREPAID_STATUS"], peer.set_vars["PREPAID_REASON"]) == (
        "DENIED", "UNKNOWN_ACCOUNT")
    assert (await store.ledger.get("1001")).available == EUR


async def test_callerid_as_a_source_is_warned_about_at_start(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    store = await open_store(make_settings(redis_url, account_sources=("accountcode",
                                                                      "callerid")))
    server = AgiServer(store, host="127.0.0.1", port=0)
    with caplog.at_level(logging.WARNING, logger="agi.server"):
        await server.start()
    try:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "chooses the paying account" in warnings[0]
    finally:
        await server.close()
        await store.close()


SECRET = "s3cr3t-0f-th1s-t3st"


def refused_secret() -> float:
    return REGISTRY.get_sample_value("prepaid_agi_refused_total", {"why": "secret"}) or 0.0


async def test_a_request_without_the_secret_is_refused_before_any_lookup(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    store, server = await start(make_settings(redis_url, secret=SECRET))
    try:
        await store.rates.replace(parse_csv(DECK))
        await account(store, "1001", EUR)
        before = refused_secret()
        caplog.set_level(logging.DEBUG, logger="agi.server")
        # 27 strangers: none with the secret, one with a wrong one, one with a prefix of it.
        strangers = [agi_env(f"evil{n}") for n in range(25)]
        strangers += [agi_env("evil-wrong", agi_arg_1="guess"),
                      agi_env("evil-prefix", agi_arg_1=SECRET[:-1])]
        for env in strangers:
            peer = AgiPeer(env)
            assert await peer.call(server.port) == []  # not one AGI command
        assert refused_secret() - before == 27
        held = await store.ledger.get("1001")
        assert (held.available, await store.ledger.holds("1001")) == (EUR, {})
        records = [k async for k in store.redis.scan_iter(match="prepaid:callref:*")]
        assert records == []
        warnings = [r.getMessage() for r in caplog.records
                    if r.name == "agi.server" and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "refused" in warnings[0] and SECRET not in warnings[0]
        # Asterisk's request, with the secret: served, and the flood summed up once.
        good = AgiPeer(agi_env("real1", agi_arg_1=SECRET))
        await good.call(server.port)
        assert good.set_vars["PREPAID_STATUS"] == "ALLOWED"
        infos = [r.getMessage() for r in caplog.records
                 if r.name == "agi.server" and r.levelno == logging.INFO
                 and "accepted again" in r.getMessage()]
        assert len(infos) == 1 and "27 refused" in infos[0]
        assert all(SECRET not in r.getMessage() for r in caplog.records)
    finally:
        await server.close()
        await store.close()


async def test_the_number_override_follows_the_secret(redis_url: str) -> None:
    store, server = await start(make_settings(redis_url, secret=SECRET))
    try:
        await store.rates.replace(parse_csv(DECK))
        await account(store, "1001", EUR)
        peer = AgiPeer(agi_env("num1", "s", agi_arg_1=SECRET, agi_arg_2="00441234567"))
        await peer.call(server.port)
        assert peer.set_vars["PREPAID_STATUS"] == "ALLOWED"
        [amount] = (await store.ledger.holds("1001")).values()
        assert amount == 6_000  # the United Kingdom's first block, not the extension 's'
    finally:
        await server.close()
        await store.close()


def test_the_secret_comes_from_the_environment_and_is_never_shown() -> None:
    env = {"PREPAID_AGI_SECRET": SECRET}
    agi = config.parse({}, "<test>", env=env).agi
    assert agi.secret == SECRET and SECRET not in repr(agi)
    with pytest.raises(ConfigError) as err:
        config.parse({"agi": {"secret": 12345678}}, "<test>", env={})
    assert "12345678" not in str(err.value)


def test_other_hosts_in_allow_need_a_secret() -> None:
    with pytest.raises(ConfigError, match=r"\[agi\] secret"):
        config.parse({"agi": {"allow": ["127.0.0.1", "10.0.0.5"]}}, "<test>", env={})
    agi = config.parse({"agi": {"allow": ["10.0.0.5"], "secret": SECRET}}, "<test>",
                       env={}).agi
    assert agi.allow == ("10.0.0.5",)
    assert config.parse({"agi": {"allow": ["127.0.0.1", "::1"]}}, "<test>", env={}).agi


async def test_one_client_cannot_hold_more_than_its_connections(redis_url: str) -> None:
    address = host_address()
    allow = ("127.0.0.0/8", "::1") + ((address,) if address else ())
    store = await open_store(make_settings(redis_url, max_connections_per_client=3,
                                           allow=allow, header_timeout=30.0))
    server = AgiServer(store, host="0.0.0.0", port=0)
    await server.start()
    idle = []
    try:
        await store.rates.replace(parse_csv(DECK))
        await account(store, "1001", EUR)
        for _ in range(3):  # a stranger's idle connections, sending no header
            idle.append(await asyncio.open_connection("127.0.0.1", server.port))
        before = REGISTRY.get_sample_value("prepaid_agi_refused_total",
                                           {"why": "per_client"}) or 0.0
        crowded = AgiPeer(agi_env("crowded1"))
        try:
            await crowded.call(server.port)
        except ConnectionResetError:
            pass  # closed with the header unread
        assert crowded.commands == [] and server.rejected == 1
        assert REGISTRY.get_sample_value("prepaid_agi_refused_total",
                                         {"why": "per_client"}) == before + 1
        if address is not None:  # another address has its own share
            other = AgiPeer(agi_env("other1"))
            await other.call(server.port, host=address)
            assert other.set_vars["PREPAID_STATUS"] == "ALLOWED"
        reader, writer = idle.pop()
        writer.close()
        await writer.wait_closed()
        # Its server side ends (EOF in the header); the other two idle ones stay open.
        done, _ = await asyncio.wait(set(server._tasks), timeout=5,
                                     return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1 and sum(server._per_client.values()) == 2
        again = AgiPeer(agi_env("again1"))
        await again.call(server.port)
        assert again.set_vars["PREPAID_STATUS"] == "ALLOWED"
    finally:
        for _, writer in idle:
            writer.close()
        await server.close()
        await store.close()



async def test_a_live_calls_uniqueid_reused_never_overwrites_its_record_or_hold(
        served: tuple[Store, AgiServer], caplog: pytest.LogCaptureFixture) -> None:
    store, server = served
    await account(store, "1001", EUR)
    await account(store, "2002", EUR)
    first = AgiPeer(agi_env("dup1", callerid="1001"))
    await first.call(server.port)
    assert first.set_vars["PREPAID_STATUS"] == "ALLOWED"
    record = await store.redis.hgetall(record_key("prepaid", "dup1"))
    holds = await store.ledger.holds("1001")
    # Another account's authorization with the same uniqueid: refused, nothing of the live
    # call touched, and the other account's hold given back.
    caplog.set_level(logging.ERROR, logger="agi.routes")
    other = AgiPeer(agi_env("dup1", callerid="2002"))
    await other.call(server.port)
    assert (other.set_vars["PREPAID_STATUS"], other.set_vars["PREPAID_REASON"]) == (
        "ERROR", "DUPLICATE_CALL")
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "has a record already (account '1001'" in errors[0]
    # The same account again (a transfer back into the dialplan): refused IN_CALL.
    again = AgiPeer(agi_env("dup1", callerid="1001"))
    await again.call(server.port)
    assert again.set_vars["PREPAID_REASON"] == "IN_CALL"
    assert await store.redis.hgetall(record_key("prepaid", "dup1")) == record
    assert await store.ledger.holds("1001") == holds
    assert await store.ledger.holds("2002") == {}
    assert (await store.ledger.get("2002")).available == EUR
