"""The ``menu`` route (*101) over FastAGI, driven by the AGI peer exactly as Asterisk speaks,
against a real Redis, with the policy worker's phone top-ups running beside it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agi.ivr import collect
from agi.menu import Ask
from agi.protocol import AgiSession
from agi.server import AgiServer
from policy.gateway import SandboxGateway
from policy.phone import PhoneTopups
from prepaid import pins
from prepaid.store import Store, open_store
from testbed.agi_peer import AgiPeer, agi_env
from tests.test_agi_fastagi import make_settings, start

EUR = 1_000_000
ESC = '"0123456789*#"'
GET_PIN = "GET DATA prepaid/enter-pin 6000 8"


@pytest.fixture
async def agi(redis_url: str) -> AsyncIterator[tuple[Store, AgiServer]]:
    store, server = await start(make_settings(redis_url, topup_wait_seconds=5.0))
    yield store, server
    await server.close()
    await store.close()


async def customer(store: Store, ident: str = "1001", *, token: str = "tok_ok",
                   pin: str | None = "1234", **policy: str) -> None:
    await store.ledger.create_account(ident, currency="EUR", email="ann@example.org")
    await store.ledger.credit(ident, 9_500_000, key=f"seed:{ident}")
    card = {"card_token": token, "card_brand": "visa", "card_last4": "4242",
            "card_exp": "12/30"} if token else {}
    await store.ledger.update(ident, **card, **policy)
    if pin:
        await pins.set_pin(store.ledger, ident, pin)


def caller(*keys: str, account: str = "1001") -> AgiPeer:
    return AgiPeer(agi_env("1700000000.7", "*101", callerid=account, script="menu"),
                   keys=list(keys))


async def with_worker(store: Store, peer: AgiPeer, server: AgiServer,
                      **kw: Any) -> list[str]:
    worker = PhoneTopups(store.redis, store.ledger, store.settings,
                         SandboxGateway(store.redis, store.ledger.prefix), consumer="t1",
                         retry_idle_ms=0, **kw)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop, block_ms=50))
    try:
        return await peer.call(server.port, within=30)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


def streamed(commands: list[str]) -> list[str]:
    return [c.split()[2] for c in commands if c.startswith("STREAM FILE ")]


async def test_a_caller_tops_up_10_from_the_card_with_the_pin(
        agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    await customer(store)
    # PIN, "10 euros" (preset 2), confirm; then no key three times: goodbye.
    commands = await with_worker(store, caller("1234#", "2", "1"), server)
    assert commands[:3] == ["GET VARIABLE PREPAID_ACCOUNT", "ANSWER", GET_PIN]
    assert commands[3:9] == [f"STREAM FILE prepaid/your-balance-is {ESC}",
                             f'SAY NUMBER 9 {ESC}', f"STREAM FILE prepaid/currency-eur {ESC}",
                             f"STREAM FILE prepaid/and {ESC}", f'SAY NUMBER 50 {ESC}',
                             f"STREAM FILE prepaid/cents {ESC}"]
    assert f"SAY DIGITS 4242 {ESC}" in commands
    said = streamed(commands)
    assert said.count("prepaid/you-chose") == 1 and "prepaid/one-moment" in said
    done = said.index("prepaid/topup-done")
    assert said[done + 1] == "prepaid/your-balance-is"
    assert commands[commands.index(f"STREAM FILE prepaid/topup-done {ESC}") + 2] == (
        f"SAY NUMBER 19 {ESC}")
    assert said[-1] == "prepaid/goodbye"
    acct = await store.ledger.get("1001")
    assert acct.balance == 19_500_000
    charges = await SandboxGateway(store.redis, store.ledger.prefix).charges("1001")
    assert [c["amount"] for c in charges.values()] == [10 * EUR]
    [credit] = [e for e in await store.ledger.history("1001") if e.ref.startswith("phone")]
    assert credit.amount == 10 * EUR


async def test_three_wrong_pins_hang_up_and_five_lock_the_menu(
        agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    await customer(store)
    commands = await caller("1111#", "2222#", "3333#").call(server.port)
    assert commands.count(GET_PIN) == 3
    assert streamed(commands) == ["prepaid/pin-wrong", "prepaid/pin-wrong", "prepaid/pin-wrong",
                                  "prepaid/goodbye"]
    assert "prepaid/your-balance-is" not in " ".join(commands)
    # Two more wrong ones on the next call: the fifth locks it, even for the right PIN.
    await caller("4444#", "5555#", "1234#").call(server.port)
    commands = await caller("1234#").call(server.port)
    assert streamed(commands) == ["prepaid/pin-locked", "prepaid/goodbye"]
    assert await pins.verify_pin(store.ledger, "1001", "1234") is pins.PinCheck.LOCKED


async def test_a_top_up_nobody_charges_in_time_says_try_later_and_is_never_charged(
        redis_url: str) -> None:
    store, server = await start(make_settings(redis_url, topup_wait_seconds=0.3))
    try:
        await customer(store)
        commands = await caller("1234#", "1", "1").call(server.port, within=30)  # no worker
        said = streamed(commands)
        assert said[said.index("prepaid/one-moment") + 1] == "prepaid/topup-try-later"
        # A worker that comes later finds the request abandoned and charges nothing.
        worker = PhoneTopups(store.redis, store.ledger, store.settings,
                             SandboxGateway(store.redis, store.ledger.prefix), consumer="late")
        assert await worker.process_batch() == 1
        assert await SandboxGateway(store.redis, store.ledger.prefix).charges("1001") == {}
        assert (await store.ledger.get("1001")).balance == 9_500_000
    finally:
        await server.close()
        await store.close()


async def test_the_caller_turns_automatic_top_up_on_and_changes_the_pin(
        agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    await customer(store, threshold=str(5 * EUR), topup_amount=str(20 * EUR),
                   action="email", policy_enabled="1")
    commands = await caller("1234#", "7", "8", "9876#", "9876#").call(server.port)
    said = streamed(commands)
    assert "prepaid/auto-on-option" in said and "prepaid/auto-now-on" in said
    assert said.index("prepaid/auto-off-option") > said.index("prepaid/auto-now-on")
    assert "prepaid/pin-changed" in said
    acct = await store.ledger.get("1001")
    assert (acct.action, acct.policy_enabled) == ("topup", True)
    assert await pins.verify_pin(store.ledger, "1001", "9876") is pins.PinCheck.OK


async def test_without_a_card_automatic_top_up_cannot_be_turned_on(
        agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    await customer(store, token="", threshold=str(5 * EUR), action="email",
                   policy_enabled="1")
    commands = await caller("1234#", "7").call(server.port)
    said = streamed(commands)
    assert "prepaid/no-card" in said and "prepaid/invalid-choice" in said
    assert (await store.ledger.get("1001")).action == "email"


async def test_the_paying_account_is_the_one_asterisk_names(
        agi: tuple[Store, AgiServer]) -> None:
    store, server = agi
    await customer(store)
    await customer(store, "2002", pin="2222")
    # The dialplan's PREPAID_ACCOUNT wins over the endpoint's accountcode, as for calls.
    peer = caller("2222#", "1", "1")
    peer.variables["PREPAID_ACCOUNT"] = "2002"
    await with_worker(store, peer, server)
    assert (await store.ledger.get("2002")).balance == 14_500_000
    assert (await store.ledger.get("1001")).balance == 9_500_000
    commands = await caller("1234#", account="nobody").call(server.port)
    assert streamed(commands) == ["prepaid/account-unknown"]


async def test_an_unreachable_redis_says_the_call_cannot_be_completed(
        redis_url: str) -> None:
    settings = make_settings(redis_url)
    dead = dataclasses.replace(settings, redis=dataclasses.replace(
        settings.redis, url="redis://127.0.0.1:1/0"))
    store = await open_store(dead, check=False)
    server = AgiServer(store, host="127.0.0.1", port=0)
    await server.start()
    try:
        commands = await caller("1234#").call(server.port, within=20)
        assert streamed(commands) == ["prepaid/call-cannot-be-completed"]
    finally:
        await server.close()
        await store.close()


class Sent:
    """The AGI session's writer: keeps the command lines."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.lines.append(data)

    async def drain(self) -> None:
        return None


async def test_a_slow_pin_entry_may_outlast_the_command_timeout() -> None:
    reader = asyncio.StreamReader()
    session = AgiSession({}, reader, Sent(), command_timeout=0.1)
    # Asterisk answers GET DATA only once the caller has keyed the PIN.
    asyncio.get_running_loop().call_later(0.4, reader.feed_data, b"200 result=1234\n")
    assert await collect(session, Ask((("file", "prepaid/enter-pin"),), 8, pin=True)) == "1234"
    assert session.sent == ["GET DATA prepaid/enter-pin 6000 8"]
