"""The *101 self-service menu on a real Asterisk 22: the shipped dialplan, the project's
services in-process (FastAGI, metering, policy worker with its phone top-ups), a real Redis
and SMTP server.

The caller is the first half of a Local channel (AMI Originate of ``Local/*101@prepaid-
outbound``, the account as its accountcode, then ``Wait``); the menu runs on the other half.
The test keys DTMF into the call with AMI ``PlayDTMF`` on the caller's half, each time once
Asterisk reports (``AGIExecStart``) that the menu's AGI command that listens for it has
begun; the digits cross the Local channel as DTMF frames and cut the prompt short, as a
phone's would. Every wait is for an AMI event, a mail or a ledger state, with a bound.
"""

from __future__ import annotations

import asyncio
import re
import secrets

import pytest

from policy.gateway import SandboxGateway
from prepaid import pins
from testbed.ami import Message, event
from testbed.smtp_sink import body_text
from tests.e2e.test_system_e2e import EUR, System, system, until

pytestmark = pytest.mark.pbx
__all__ = ["system"]  # the fixture


class MenuCall:
    """One call into *101 and the keys pressed into it."""

    def __init__(self, sys_: System, account: str) -> None:
        self.system, self.account = sys_, account
        self.ref = f"ivr{secrets.token_hex(5)}"  # the menu's half (;2), where the AGI runs
        self.caller = ""  # the caller's half (;1): its channel name
        self.seen = 0  # AGI commands of this call already waited for

    async def dial(self) -> MenuCall:
        ami = self.system.ami
        resp = await ami.action(
            "Originate", Channel="Local/*101@prepaid-outbound", Application="Wait",
            Data="120", CallerID=f'"{self.account}" <{self.account}>', Account=self.account,
            Async="true", Timeout="30000", ChannelId=f"c{self.ref}", OtherChannelId=self.ref)
        assert resp["Response"] == "Success", resp
        new = await ami.wait_event(event("Newchannel", Uniqueid=f"^c{self.ref}$"), 15)
        self.caller = new["Channel"]
        return self

    def commands(self) -> list[str]:
        """The AGI commands the menu sent on this call, as Asterisk ran them."""
        return [m["Command"] for m in self.system.ami.seen
                if m.get("Event") == "AGIExecStart" and m.get("Uniqueid") == self.ref]

    def streamed(self) -> list[str]:
        return [c.split()[2] for c in self.commands() if c.startswith("STREAM FILE ")]

    async def until(self, pattern: str, within: float = 30) -> str:
        """Wait until the menu starts an AGI command matching ``pattern``, after the ones
        waited for before; returns it."""
        rx = re.compile(pattern)

        async def found() -> str | None:
            cmds = self.commands()
            for n in range(self.seen, len(cmds)):
                if rx.search(cmds[n]):
                    self.seen = n + 1
                    return cmds[n]
            return None

        return await until(found, f"the menu's AGI command {pattern!r}", within)

    async def press(self, keys: str) -> None:
        for key in keys:
            resp = await self.system.ami.action("PlayDTMF", Channel=self.caller, Digit=key,
                                                Duration="120")
            assert resp["Response"] == "Success", resp

    async def hung_up(self, within: float = 20) -> Message:
        return await self.system.ami.wait_event(event("Hangup", Uniqueid=f"^{self.ref}$"),
                                                within)

    async def hang_up(self) -> None:
        await self.system.ami.action("Hangup", Channel=self.caller)
        await self.hung_up()


async def customer(sys_: System, account: str, *, pin: str = "1234") -> None:
    await sys_.account(account, 9_500_000, email=f"{account}@e2e.example")
    await sys_.store.ledger.update(account, card_token="tok_ok", card_brand="visa",
                                   card_last4="4242", card_exp="12/30")
    await pins.set_pin(sys_.store.ledger, account, pin)


async def test_a_caller_tops_up_10_euros_by_phone_with_the_pin(system: System) -> None:
    await system.start()
    await customer(system, "3001")
    call = await MenuCall(system, "3001").dial()
    await call.until(r"^GET DATA prepaid/enter-pin ")
    await call.press("1234#")
    await call.until(r"^SAY DIGITS 2 ")  # "... 10 euros, press 2"
    await call.press("2")
    await call.until(r"^STREAM FILE prepaid/confirm-or-cancel ")
    await call.press("1")  # "to confirm, press 1"
    await call.until(r"^STREAM FILE prepaid/topup-done ")
    await call.until(r"^STREAM FILE prepaid/your-balance-is ")
    assert await call.until(r"^SAY NUMBER ") == 'SAY NUMBER 19 "0123456789*#"'
    await call.hang_up()

    acct = await system.store.ledger.get("3001")
    assert acct.balance == 19_500_000
    charges = await SandboxGateway(system.store.redis, "prepaid").charges("3001")
    assert [c["amount"] for c in charges.values()] == [10 * EUR], charges
    phone = [e for e in await system.history("3001") if e.ref.startswith("phone top-up")]
    assert [e.amount for e in phone] == [10 * EUR]
    mail = await asyncio.to_thread(
        system.smtp.wait_for, lambda m: "3001@e2e.example" in str(m["To"]), 10)
    assert str(mail["Subject"]) == "Top-up of EUR 10.00 by phone"
    assert "visa ending 4242" in body_text(mail)
    said = call.streamed()
    assert said[:5] == ["prepaid/your-balance-is", "prepaid/currency-eur", "prepaid/and",
                        "prepaid/cents", "prepaid/no-low-balance-action"]
    for prompt in ("to-add", "from-card-ending", "you-chose", "confirm-or-cancel",
                   "one-moment", "topup-done"):
        assert f"prepaid/{prompt}" in said, said
    assert 'SAY DIGITS 4242 "0123456789*#"' in call.commands()
    # Every prompt was found and played by Asterisk (a missing one would end the menu).
    log = system.pbx.log_text()
    assert re.search(r"Playing 'prepaid/topup-done\.", log)
    assert not re.search(r"prepaid/[a-z-]+.*does not exist", log)


async def test_wrong_pins_hang_up_and_then_lock_the_menu(system: System) -> None:
    await system.start()
    await customer(system, "3002")
    call = await MenuCall(system, "3002").dial()
    for wrong in ("1111#", "2222#", "3333#"):
        await call.until(r"^GET DATA prepaid/enter-pin ")
        await call.press(wrong)
    await call.until(r"^STREAM FILE prepaid/goodbye ")
    await call.hung_up()
    assert call.streamed() == ["prepaid/pin-wrong"] * 3 + ["prepaid/goodbye"]
    # Two more wrong on the next call make five: the right PIN is then refused, locked.
    call = await MenuCall(system, "3002").dial()
    for key in ("4444#", "5555#", "1234#"):
        await call.until(r"^GET DATA prepaid/enter-pin ")
        await call.press(key)
    await call.until(r"^STREAM FILE prepaid/pin-locked ")
    await call.hung_up()
    assert call.streamed() == ["prepaid/pin-wrong"] * 2 + ["prepaid/pin-locked",
                                                           "prepaid/goodbye"]
    assert "prepaid/your-balance-is" not in call.streamed()
    acct = await system.store.ledger.get("3002")
    assert acct.balance == 9_500_000
    assert await SandboxGateway(system.store.redis, "prepaid").charges("3002") == {}
