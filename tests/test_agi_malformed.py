"""Malformed AGI input: the server closes that connection, logs it, and serves the next call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from agi.protocol import AgiError, AgiSession
from agi.server import AgiServer
from prepaid.ratedeck import parse_csv
from prepaid.store import Store, open_store
from testbed.agi_peer import GET_CALLER, AgiPeer, agi_env
from tests.test_agi_fastagi import DECK, make_settings


@pytest.fixture
async def agi(redis_url: str) -> AsyncIterator[tuple[Store, AgiServer]]:
    store = await open_store(make_settings(redis_url))
    server = AgiServer(store, host="127.0.0.1", port=0, header_timeout=0.5)
    await server.start()
    await store.rates.replace(parse_csv(DECK))
    await store.ledger.create_account("1001", currency="EUR")
    await store.ledger.credit("1001", 1_000_000, key="seed")
    yield store, server
    await server.close()
    await store.close()


async def send_and_wait_close(port: int, data: bytes, *, close_write: bool = False) -> bytes:
    """Send raw bytes; return what the server sent before closing (bounded wait)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if close_write:
            writer.write_eof()
        async with asyncio.timeout(3):
            return await reader.read()
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def next_call_is_served(server: AgiServer) -> None:
    peer = AgiPeer(agi_env("after", "00491701234567"))
    await peer.call(server.port)
    assert peer.set_vars["PREPAID_STATUS"] == "ALLOWED"


@pytest.mark.parametrize("data", [
    b"hello world\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"agi_network: yes\n" + b"agi_x" + b"A" * 100_000 + b": 1\n\n",
    b"".join(b"agi_v%d: 1\n" % i for i in range(1000)) + b"\n",
    b"\n",
    b"\xff\xfe\x00\x01garbage\n\n",
])
async def test_bad_header_is_dropped_and_server_survives(
        agi: tuple[Store, AgiServer], data: bytes, caplog: pytest.LogCaptureFixture) -> None:
    _, server = agi
    assert await send_and_wait_close(server.port, data) == b""
    assert server.rejected == 1
    assert any("dropped" in r.getMessage() for r in caplog.records)
    await next_call_is_served(server)


async def test_early_eof_in_header(agi: tuple[Store, AgiServer]) -> None:
    _, server = agi
    sent = b"agi_network: yes\nagi_uniqueid: 1.2\n"
    assert await send_and_wait_close(server.port, sent, close_write=True) == b""
    await next_call_is_served(server)


async def test_silent_peer_is_dropped_after_the_header_timeout(
        agi: tuple[Store, AgiServer]) -> None:
    _, server = agi
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"agi_network: yes\n")
    async with asyncio.timeout(3):  # header timeout is 0.5 s
        assert await reader.read() == b""
    writer.close()
    await next_call_is_served(server)


async def test_garbage_reply_ends_the_session_and_releases(agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    env = agi_env("g1", "00491701234567")
    writer.write(("".join(f"{k}: {v}\n" for k, v in env.items()) + "\n").encode())
    async with asyncio.timeout(3):
        assert await reader.readline() == (GET_CALLER + "\n").encode()
        writer.write(b"200 result=1 (g1/)\n")
        assert (await reader.readline()).startswith(b"EXEC MSet PREPAID_STATUS=ALLOWED,")
        writer.write(b"this is not AGI\n")
        assert await reader.read() == b""
    writer.close()
    assert await store.ledger.holds("1001") == {}
    await next_call_is_served(server)


async def test_peer_vanishing_mid_session_releases(agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    env = agi_env("g2", "00491701234567")
    writer.write(("".join(f"{k}: {v}\n" for k, v in env.items()) + "\n").encode())
    async with asyncio.timeout(3):
        await reader.readline()
        writer.write(b"200 result=1 (g2/)\n")
        assert (await reader.readline()).startswith(b"EXEC MSet PREPAID_STATUS=ALLOWED,")
    writer.close()
    await writer.wait_closed()
    for _ in range(300):  # polling a condition with a deadline (3 s)
        if not await store.ledger.holds("1001"):
            break
        await asyncio.sleep(0.01)
    assert await store.ledger.holds("1001") == {}
    await next_call_is_served(server)


async def test_server_stops_cleanly_with_a_session_open(redis_url: str) -> None:
    store = await open_store(make_settings(redis_url))
    server = AgiServer(store, host="127.0.0.1", port=0)
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"agi_network: yes\n")
    await writer.drain()
    async with asyncio.timeout(3):
        for _ in range(300):
            if server._tasks:
                break
            await asyncio.sleep(0.01)
        await server.close(grace=0.1)
        assert await reader.read() == b""
    writer.close()
    await store.close()


class _Sink:
    def __init__(self) -> None:
        self.sent = b""

    def write(self, data: bytes) -> None:
        self.sent += data

    async def drain(self) -> None:
        pass


async def test_a_multi_line_520_reply_is_read_whole_and_the_next_reply_is_its_own() -> None:
    # As Asterisk 22's res_agi answers a command with bad syntax (ast_agi_send of the usage).
    reader = asyncio.StreamReader()
    reader.feed_data(b"520-Invalid command syntax.  Proper usage follows:\n"
                     b"Usage: GET FULL VARIABLE <variablename> [<channel name>]\n"
                     b"        Returns 0 if <variablename> is not set or channel does not exist.\n"
                     b"520 End of proper usage.\n"
                     b"200 result=0\n")
    session = AgiSession({}, reader, _Sink())
    with pytest.raises(AgiError, match="520-Invalid command syntax"):
        await session.command("GET FULL VARIABLE")
    reply = await session.command("ANSWER")
    assert (reply.code, reply.result) == (200, 0)
