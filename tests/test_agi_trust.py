"""Who may authorize and who pays (issue 11, parts 2 and 3): FastAGI over TCP in the real
wire format, against a real Redis."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator

import pytest

from agi.server import AgiServer
from prepaid import config
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
