"""The whole system end to end: a real Asterisk 22 running the project's dialplan and AMI user,
the project's services (FastAGI authorization, AMI metering, policy worker) started in-process
by ``shell.serve.run_services``, a real Redis and a real SMTP server. Calls are placed by AMI
Originate (``Local/<number>@prepaid-outbound``) and by SIPp (a SIP phone whose From user is
the account).

Short rates (1/1 and 6/6 billing, high prices) and calls of a few seconds keep the tier fast.
Nothing sleeps for luck: every wait is for an AMI event, a log line, a mail or a ledger state,
with a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ami_listener.meter import calls_key
from prepaid.callrecord import record_key
from prepaid.config import Settings, parse
from prepaid.ledger import Account, Entry
from prepaid.ratedeck import Normalisation, parse_csv
from prepaid.rating import Rate, cost
from prepaid.store import Store, open_store
from shell.serve import run_services
from testbed.ami import Ami, Message, event
from testbed.pbx import Pbx, free_port, project_ami_user
from testbed.replies import entries, fields
from testbed.servers import toml_text
from testbed.sipload import SCENARIOS
from testbed.smtp_sink import SmtpSink, body_text
from tests.conftest import assert_verified

pytestmark = pytest.mark.pbx

T = TypeVar("T")
EUR = 1_000_000
PREPAID = str(Path(sys.executable).parent / "prepaid")
SIPP_SCENARIO = SCENARIOS / "uac_account.xml"

# 60.00 a minute is 1.00 a second: easy to check by hand. Numbers are dialed as 00<digits>;
# the test-bed trunk answers 0088NN... and hangs up after NN s, answers anything else and
# stays up (see testbed/pbx_conf/extensions.conf).
RATES_CSV = """\
prefix,name,price_per_minute,connect_fee,initial_increment,increment
88,Hang-up trunk 1/1,60.00,0,1,1
8804,Hang-up trunk 6/6 with connect fee,30.00,0.10,6,6
39,Stay-up trunk 1/1,60.00,0,1,1
"""
DECK = parse_csv(RATES_CSV, "e2e-rates.csv")
NORM = Normalisation(("+", "00"), "", "")



def rate_for(number: str) -> Rate:
    return DECK.lookup(number, NORM)


def config_for(redis_url: str, pbx: Pbx, agi_port: int, smtp_port: int,
               **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    user, secret = project_ami_user()
    data: dict[str, dict[str, Any]] = {
        "redis": {"url": redis_url, "timeout": 2.0},
        "billing": {"currency": "EUR", "national_prefix": "", "country_code": "",
                    "max_call_seconds": 600},
        "ami": {"host": "127.0.0.1", "port": pbx.ami_port, "username": user, "secret": secret,
                "reconnect_max_seconds": 1.0},
        "agi": {"listen": f"127.0.0.1:{agi_port}"},
        "smtp": {"host": "127.0.0.1", "port": smtp_port, "from": "prepaid@e2e.example"},
        "payments": {"gateway": "sandbox"},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def serve_process(config: Path, names: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [PREPAID, "--config", str(config), "serve",
             *[x for n in names for x in ("--only", n)]],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)


async def until(check: Callable[[], Awaitable[T | None]], what: str,
                within: float = 10.0) -> T:
    """Poll ``check`` (every 50 ms, bounded) until it returns something other than None/False."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Services:
    names: tuple[str, ...]
    stop: asyncio.Event
    task: asyncio.Task[None]


@dataclass
class Call:
    ref: str
    account: str
    number: str
    answered: Message | None = None
    hangup: Message | None = None
    cdr: Message | None = None

    @property
    def talk_seconds(self) -> float:
        """Answer (DialEnd ANSWER) to the caller channel's Hangup, by Asterisk's clock."""
        assert self.answered is not None and self.hangup is not None
        return float(self.hangup["Timestamp"]) - float(self.answered["Timestamp"])

    @property
    def billsec(self) -> int:
        assert self.cdr is not None
        return int(self.cdr["BillableSeconds"])


@dataclass
class System:
    pbx: Pbx
    settings: Settings
    store: Store
    ami: Ami
    smtp: SmtpSink
    caplog: pytest.LogCaptureFixture
    config: Path
    services: list[Services] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    # -- services ---------------------------------------------------------------------
    async def start(self, names: Sequence[str] = ("agi", "ami", "policy")) -> Services:
        mark = len(self.caplog.records)
        stop = asyncio.Event()
        task = asyncio.create_task(run_services(self.settings, list(names), stop),
                                   name=f"e2e-serve-{'+'.join(names)}")
        svc = Services(tuple(names), stop, task)
        self.services.append(svc)
        ready = {"agi": "FastAGI listening on", "ami": "AMI connected to",
                 "policy": "policy worker"}
        for name in names:
            await self.wait_log(ready[name], start=mark, task=task)
        return svc

    async def stop_services(self, svc: Services, *, kill: bool = False) -> None:
        """Stop cleanly, or ``kill``: cancel the task as abruptly as asyncio allows."""
        if kill:
            svc.task.cancel()
        else:
            svc.stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(svc.task, 15)
        self.services.remove(svc)

    async def spawn(self, names: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        """``prepaid serve --only ...`` as its own process (so it can really be killed); back
        once the metering user has logged in to Asterisk."""
        assert names == ["ami"], "readiness is only checked for the AMI listener"
        mark = len(self.pbx.log_text())
        user = self.settings.ami.username
        proc = serve_process(self.config, names, log)
        self.processes.append(proc)
        await asyncio.to_thread(self.pbx.wait_for_log, f"Manager '{user}' logged on", 20, mark)
        return proc

    async def wait_log(self, text: str, *, start: int = 0, within: float = 10.0,
                       task: asyncio.Task[None] | None = None) -> logging.LogRecord:
        async def check() -> logging.LogRecord | None:
            if task is not None and task.done():
                raise AssertionError(f"services ended early: {task.exception()!r}")
            for rec in self.caplog.records[start:]:
                if text in rec.getMessage():
                    return rec
            return None

        return await until(check, f"log line {text!r}", within)

    def log_lines(self, text: str, start: int = 0) -> list[str]:
        return [r.getMessage() for r in self.caplog.records[start:] if text in r.getMessage()]

    def timeline(self, ref: str) -> str:
        """The call's AMI events (caller channel and the Local half that placed it), for
        assertion messages."""
        lines = []
        t0: float | None = None
        for m in self.ami.seen:
            if ref not in m.get("Uniqueid", "") + m.get("UniqueID", "") + m.get("Linkedid", ""):
                continue
            if m.get("Event") not in ("DialBegin", "DialEnd", "BridgeEnter", "BridgeLeave",
                                      "Hangup", "Cdr", "Newstate", "VarSet"):
                continue
            if m.get("Event") == "VarSet" and not m.get("Variable", "").startswith("PREPAID"):
                continue
            t = float(m.get("Timestamp", "0") or 0)
            t0 = t if t0 is None else t0
            what = m.get("Variable", "") or m.get("DialStatus", "") or m.get("Cause-txt", "")
            lines.append(f"{t - t0:8.3f} {m.get('Event')} {m.get('Channel', '')} {what}")
        return "\n".join(lines)

    # -- accounts ---------------------------------------------------------------------
    async def account(self, name: str, balance: int, **kwargs: Any) -> Account:
        await self.store.ledger.create_account(name, currency="EUR", **kwargs)
        if balance:
            await self.store.ledger.credit(name, balance, key=f"seed:{name}", ref="e2e seed")
        return await self.store.ledger.get(name)

    async def history(self, name: str) -> list[Entry]:
        return await self.store.ledger.history(name, 100)

    # -- calls ------------------------------------------------------------------------
    async def originate(self, number: str, account: str) -> Call:
        """AMI Originate of Local/<number>@prepaid-outbound with the account as accountcode
        (and caller id); the dialplan side of the Local channel (;2) gets the Uniqueid ``ref``."""
        ref = f"e2e{secrets.token_hex(6)}"
        resp = await self.ami.action(
            "Originate", Channel=f"Local/{number}@prepaid-outbound", Application="Wait",
            Data="300", CallerID=f'"{account}" <{account}>', Account=account, Async="true",
            Timeout="30000",
            ChannelId=f"orig-{ref}", OtherChannelId=ref)
        assert resp["Response"] == "Success", resp
        return Call(ref, account, number)

    def sipp_call(self, number: str, account: str, timeout: int = 30) -> asyncio.Task[Any]:
        """One SIPp call from [caller]=account to number; the task ends when Asterisk hangs up."""
        inner = f"{self.pbx.run_dir_inner}/uac_account.xml"
        shutil.copyfile(SIPP_SCENARIO, self.pbx.run_dir / "uac_account.xml")
        args = ["-sf", inner, "-key", "caller", account, "-s", number, "-m", "1",
                "-i", "127.0.0.1", "-p", str(self.pbx.sipp_port), "-timeout", f"{timeout}s",
                "-timeout_error", f"127.0.0.1:{self.pbx.sip_port}"]
        return asyncio.create_task(asyncio.to_thread(self.pbx.sipp, args, timeout + 15))

    async def sipp_ref(self, account: str, within: float = 10) -> str:
        """The callref the AGI gave the SIP call of ``account`` (its PJSIP channel)."""
        msg = await self.ami.wait_event(
            event("VarSet", Variable="^PREPAID_CALLREF$", Channel="^PJSIP/sipp-",
                  CallerIDNum=f"^{re.escape(account)}$"), within)
        return msg["Value"]

    async def status(self, ref: str, within: float = 10) -> tuple[str, str]:
        status = await self.ami.wait_event(
            event("VarSet", Uniqueid=f"^{ref}$", Variable="^PREPAID_STATUS$"), within)
        reason = await self.ami.wait_event(
            event("VarSet", Uniqueid=f"^{ref}$", Variable="^PREPAID_REASON$"), within)
        return status["Value"], reason["Value"]

    async def answered(self, call: Call, within: float = 10) -> Message:
        call.answered = await self.ami.wait_event(
            event("DialEnd", Uniqueid=f"^{call.ref}$", DialStatus="^ANSWER$"), within)
        return call.answered

    async def ended(self, call: Call, within: float = 20) -> Call:
        """Wait for the caller channel's Hangup and its Cdr, then for metering to settle."""
        call.hangup = await self.ami.wait_event(
            event("Hangup", Uniqueid=f"^{call.ref}$"), within)
        call.cdr = await self.ami.wait_event(
            lambda m: m.get("Event") == "Cdr" and m.get("UniqueID") == call.ref
            and m.get("LastApplication") == "Dial", 10)
        await self.settled(call.ref)
        return call

    async def settlement(self, account: str, ref: str) -> dict[str, str]:
        """The metering's record of the finished call (its account's call history)."""
        rows = entries(await self.store.redis.xrange(calls_key(self.store.ledger, account)))
        found = [f for _, f in rows]
        mine = [f for f in found if f.get("ref") == ref]
        assert len(mine) == 1, f"call {ref} logged {len(mine)} times: {found}"
        return mine[0]

    async def check_billed(self, call: Call, rate: Rate) -> int:
        """The call was charged once, the rate deck's cost of the seconds metering billed, and
        those seconds are Asterisk's own (CDR BillableSeconds) give or take the rounding of
        the last part-second (see test_funded_call_by_ami_is_billed_exactly). Returns the
        amount charged."""
        rec = await self.settlement(call.account, call.ref)
        history = await self.history(call.account)
        charged = spent(history, call.ref)
        assert charged == int(rec["cost"]) == cost(rate, int(rec["duration"])), (rec, history)
        assert int(rec["duration"]) in (call.billsec, call.billsec + 1), (
            f"metering billed {rec['duration']} s, Asterisk {call.billsec} s\n"
            + self.timeline(call.ref))
        return charged

    async def settled(self, ref: str, within: float = 10) -> dict[str, str]:
        async def check() -> dict[str, str] | None:
            h = fields(await self.store.redis.hgetall(record_key("prepaid", ref)))
            return h if h.get("state") in ("ended", "released") else None

        return await until(check, f"call {ref} settled by metering", within)


@pytest.fixture
async def system(make_pbx: Callable[..., Pbx], redis_url: str,
                 caplog: pytest.LogCaptureFixture, tmp_path: Path) -> AsyncIterator[System]:
    caplog.set_level(logging.INFO)
    agi_port = free_port(socket.SOCK_STREAM)
    pbx = make_pbx(agi_port=agi_port)
    smtp = SmtpSink(tmp_path / "mail").start()
    data = config_for(redis_url, pbx, agi_port, smtp.port)
    settings = parse(data, "<e2e>", env={})
    config = tmp_path / "prepaid.toml"
    config.write_text(toml_text(data))
    config.chmod(0o600)  # it holds the AMI secret
    store = await open_store(settings)
    await store.rates.replace(DECK)
    ami = await Ami.connect(pbx.ami_port, pbx.ami_username, pbx.ami_secret)
    sys_ = System(pbx, settings, store, ami, smtp, caplog, config)
    try:
        yield sys_
        await assert_verified(store.ledger)  # the scenario left no mismatch (issue 13)
    finally:
        for proc in sys_.processes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                await asyncio.to_thread(proc.wait, 15)
        for svc in list(sys_.services):
            await sys_.stop_services(svc)
        await ami.close()
        await store.close()
        smtp.stop()


def spent(history: list[Entry], ref: str) -> int:
    """What the call ``ref`` took from the balance (debits and settles minus refunds)."""
    return -sum(e.amount for e in history if ref in e.ref and e.kind != "reserve")


# ------------------------------------------------------------------------------- scenarios


async def test_funded_call_by_ami_is_billed_exactly(system: System) -> None:
    await system.start()
    await system.account("1001", 10 * EUR)
    number = "00880312345"  # the far end hangs up after 3 s
    call = await system.originate(number, "1001")
    assert await system.status(call.ref) == ("ALLOWED", "")
    await system.answered(call)
    await system.ended(call)
    rate = rate_for(number)
    acct = await system.store.ledger.get("1001")
    assert 2 <= call.billsec <= 4, call.cdr
    assert acct.held == 0
    assert acct.balance == 10 * EUR - cost(rate, call.billsec), (
        f"charged {10 * EUR - acct.balance} for Asterisk's {call.billsec} billable s "
        f"({call.talk_seconds:.3f} s answer to hangup)\n{system.timeline(call.ref)}")


async def test_funded_call_by_sipp_is_billed_exactly_6_6(system: System) -> None:
    await system.start()
    # The test bed's SIPp endpoint has accountcode sipp: the account, whatever From says.
    await system.account("sipp", 10 * EUR)
    number = "00880412345"  # 6/6 with a connect fee; the far end hangs up after 4 s
    sipp = system.sipp_call(number, "sipp")
    ref = await system.sipp_ref("sipp")
    call = Call(ref, "sipp", number)
    assert await system.status(ref) == ("ALLOWED", "")
    await system.answered(call)
    await system.ended(call)
    res = await asyncio.wait_for(sipp, 30)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rate = rate_for(number)
    assert rate.increment == 6 and rate.connect_fee == 100_000
    charged = await system.check_billed(call, rate)
    assert charged == cost(rate, call.billsec) == 100_000 + 3 * EUR  # 0.10 + 6 s at 0.50/s
    acct = await system.store.ledger.get("sipp")
    assert (acct.balance, acct.held) == (10 * EUR - charged, 0)


async def test_empty_account_is_refused_with_the_prompt_and_never_dialed(
        system: System) -> None:
    await system.start()
    await system.account("1003", 0)
    number = "00390612345678"
    mark = len(system.pbx.log_text())
    call = await system.originate(number, "1003")
    assert await system.status(call.ref) == ("DENIED", "NO_CREDIT")
    await system.ami.wait_event(event("Hangup", Uniqueid=f"^{call.ref}$"), 15)
    system.pbx.wait_for_log(r"Playing 'prepaid/balance-too-low\.", timeout=5, start=mark)
    dialed = [m for m in system.ami.seen
              if m.get("Event") in ("Newchannel", "DialBegin")
              and f"Local/{number}@default" in m.get("Channel", "") + m.get("DestChannel", "")]
    assert dialed == []
    assert not any(m.get("Event") == "DialBegin" and m.get("Uniqueid") == call.ref
                   for m in system.ami.seen)
    acct = await system.store.ledger.get("1003")
    assert (acct.balance, acct.held) == (0, 0)
    assert [e.kind for e in await system.history("1003")] == ["open"]  # nothing since


async def test_call_is_cut_off_within_one_increment_when_credit_runs_out(
        system: System) -> None:
    await system.start()
    await system.account("1004", 4 * EUR)  # 4 s at 1.00/s
    number = "00390612345678"  # the far end never hangs up
    mark = len(system.pbx.log_text())
    call = await system.originate(number, "1004")
    assert await system.status(call.ref) == ("ALLOWED", "")
    await system.answered(call)
    await system.ended(call, within=15)
    rate = rate_for(number)
    # Cut off by us, not by the far end, and no later than one increment past the credit.
    assert call.talk_seconds <= 4 + rate.increment, call.talk_seconds
    assert call.talk_seconds >= 4 - rate.increment, call.talk_seconds
    charged = await system.check_billed(call, rate)
    acct = await system.store.ledger.get("1004")
    assert (acct.balance, acct.held) == (4 * EUR - charged, 0)
    # The caller was warned: Asterisk played the prompt on the caller's own channel (Dial's
    # L(), as the AGI set it), not a channel the listener originated (it has no such right).
    assert call.answered is not None
    system.pbx.wait_for_log(rf"{re.escape(call.answered['Channel'])}> Playing "
                            r"'prepaid/credit-expires-in-one-minute\.", timeout=5, start=mark)
    assert not [m for m in system.ami.seen if m.get("Event") == "ChanSpyStart"]


async def test_credit_running_out_leaves_zero_not_an_overdraft(system: System) -> None:
    await system.start()
    await system.account("1009", 4 * EUR)  # 4 s at 1.00/s
    call = await system.originate("00390612345678", "1009")
    await system.answered(call)
    await system.ended(call, within=15)
    acct = await system.store.ledger.get("1009")
    assert call.billsec == 4, system.timeline(call.ref)
    assert (acct.balance, acct.held) == (0, 0), await system.history("1009")


async def test_two_concurrent_calls_share_one_balance(system: System) -> None:
    await system.start()
    await system.account("1005", 6 * EUR)  # 6 s of talk for both calls together
    number = "00390612345678"
    calls = [await system.originate(number, "1005") for _ in range(2)]
    for call in calls:
        assert await system.status(call.ref) == ("ALLOWED", "")
        await system.answered(call)
    for call in calls:
        await system.ended(call, within=15)
    rate = rate_for(number)
    acct = await system.store.ledger.get("1005")
    assert acct.held == 0
    # Each call ends within one increment of the shared credit running out (the overdraft of
    # that last increment is test_credit_running_out_leaves_zero_not_an_overdraft).
    assert acct.balance >= -2 * rate.increment * rate.per_minute // 60, "\n".join(
        f"{e.kind} {e.amount} -> {e.balance} held {e.held} {e.ref}"
        for e in reversed(await system.history("1005")))
    together = sum(c.talk_seconds for c in calls)
    assert together <= 6 + 2 * rate.increment, [c.talk_seconds for c in calls]
    charged = [await system.check_billed(c, rate) for c in calls]
    assert acct.balance == 6 * EUR - sum(charged)


async def test_threshold_crossing_sends_the_low_balance_mail(system: System) -> None:
    await system.start()
    await system.account("1006", 6 * EUR, email="erin@e2e.example", threshold=4 * EUR,
                         action="email")
    number = "00880312345"  # 3 s at 1.00/s: 6.00 -> 3.00, crossing 4.00
    call = await system.originate(number, "1006")
    await system.answered(call)
    await system.ended(call)
    mail = await asyncio.to_thread(
        system.smtp.wait_for, lambda m: "erin@e2e.example" in str(m["To"]), 10)
    charged = await system.check_billed(call, rate_for(number))
    acct = await system.store.ledger.get("1006")
    assert acct.balance == 6 * EUR - charged < acct.threshold
    assert "low" in str(mail["Subject"]).lower()
    text = body_text(mail)
    assert "1006" in text
    assert "4.00" in text  # the threshold
    await asyncio.sleep(0)
    assert system.smtp.count() == 1


async def test_auto_topup_during_a_call_keeps_it_alive(system: System) -> None:
    await system.start()
    await system.account("1007", 3 * EUR, email="frank@e2e.example", threshold=2 * EUR,
                         action="topup", topup_amount=10 * EUR)
    await system.store.ledger.update("1007", card_token="tok_ok", card_brand="visa",
                                     card_last4="4242", card_exp="12/30")
    number = "00880812345"  # the far end hangs up after 8 s; the credit pays 3 s
    call = await system.originate(number, "1007")
    assert await system.status(call.ref) == ("ALLOWED", "")
    await system.answered(call)
    await system.ended(call, within=20)
    history = await system.history("1007")
    topups = [e for e in history if e.kind == "credit" and "top-up" in e.ref]
    assert len(topups) == 1 and topups[0].amount == 10 * EUR, history
    assert call.talk_seconds > 7, (
        f"the call was cut after {call.talk_seconds:.1f} s although the account was topped up")
    charged = await system.check_billed(call, rate_for(number))
    acct = await system.store.ledger.get("1007")
    assert acct.balance == 13 * EUR - charged


async def test_listener_killed_and_restarted_mid_call_bills_once(system: System,
                                                                  tmp_path: Path) -> None:
    """The AMI listener runs as its own ``prepaid serve --only ami`` process; it is SIGKILLed
    once block 1 is paid and a new one started while the call goes on."""
    await system.start(("agi", "policy"))
    log = tmp_path / "ami-listener.log"
    first = await system.spawn(["ami"], log)
    await system.account("1008", 20 * EUR)
    number = "00880612345"  # the far end hangs up after 6 s
    call = await system.originate(number, "1008")
    await system.answered(call)

    async def block_1_paid() -> bool:
        return any(e.kind == "settle" and call.ref in e.ref
                   for e in await system.history("1008"))

    await until(block_1_paid, "block 1 paid (the hold settled)", 5)
    os.killpg(first.pid, signal.SIGKILL)
    await asyncio.to_thread(first.wait, 10)
    await system.spawn(["ami"], log)
    await system.ended(call, within=20)
    assert "resuming 1 call(s)" in log.read_text(), log.read_text()[-3000:]
    rate = rate_for(number)
    charged = await system.check_billed(call, rate)
    acct = await system.store.ledger.get("1008")
    assert (acct.balance, acct.held) == (20 * EUR - charged, 0)
    assert sum(e.amount for e in await system.history("1008")) == acct.balance
