"""Record the project's call scenarios through its own dialplan, with its services running.

    python -m testbed.record_scenarios [--out testbed/recordings/project] [--only NAME ...]

Starts a private Redis (``testbed.servers.RedisServer``), the Asterisk 22 test bed
(``testbed.pbx.Pbx`` with the project's ``asterisk-conf/``), an SMTP sink and the project's
services in-process (``shell.serve.run_services``: FastAGI authorization and the policy
worker for the whole run; the AMI listener beside them, stopped and started again in the
restart scenario). Each scenario's calls are placed by AMI ``Originate`` of
``Local/<number>@prepaid-outbound`` (``OtherChannelId`` fixes the dialplan side's uniqueid,
which is the call reference ``PREPAID_CALLREF``), and a raw AMI connection as the test bed's
all-rights ``[testbed]`` user records every message after its login, bytes exactly as
received. Writes ``<scenario>.ami`` and ``<scenario>.json`` (what a replay needs: accounts and
opening balances, the rate row, each call's reference, number and channel, the Cdr's
billable seconds, and what the live run charged).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from ami_listener.meter import calls_key
from ami_listener.protocol import Message, split
from prepaid.callrecord import record_key
from prepaid.config import Settings, parse
from prepaid.ratedeck import Normalisation, parse_csv
from prepaid.rating import Rate, block_cost
from prepaid.store import Store, open_store
from shell.serve import run_services
from testbed.pbx import Pbx, free_port
from testbed.servers import RedisServer
from testbed.smtp_sink import SmtpSink

log = logging.getLogger("record_scenarios")

DEFAULT_OUT = Path(__file__).resolve().parent / "recordings" / "project"
END = b"\r\n\r\n"
EUR = 1_000_000

# 60.00 a minute (1.00 a second), 0.05 to connect, billed per second (1/1): cut-offs come
# within seconds and every second is one block. The test-bed trunk picks its behaviour by
# the dialed number (testbed/pbx_conf/extensions.conf).
RATES_CSV = """\
prefix,name,price_per_minute,connect_fee,initial_increment,increment
88,Hang-up trunk 1/1,60.00,0.05,1,1
39,Stay-up trunk 1/1,60.00,0.05,1,1
33,Busy trunk 1/1,60.00,0.05,1,1
49,Ringing trunk 1/1,60.00,0.05,1,1
"""
DECK = parse_csv(RATES_CSV, "record-scenarios-rates.csv")
NORM = Normalisation(("+", "00"), "", "")


def rate_row(rate: Rate) -> str:
    """The CSV row of the deck that rated a number."""
    for line in RATES_CSV.splitlines()[1:]:
        if line.split(",", 1)[0] == rate.prefix:
            return line
    raise KeyError(rate.prefix)


# ------------------------------------------------------------------------------ the recorder


class Recorder:
    """A raw AMI connection: logs in, then keeps every message exactly as received."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.raw: list[bytes] = []
        self.msgs: list[Message] = []
        self.changed = asyncio.Condition()
        self.task: asyncio.Task[None] | None = None
        self._next = 0

    @classmethod
    async def connect(cls, port: int, user: str, secret: str) -> Recorder:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, limit=1 << 20), 5)
        banner = await asyncio.wait_for(reader.readline(), 5)
        if not banner.startswith(b"Asterisk Call Manager/"):
            raise ConnectionError(f"not an AMI banner: {banner!r}")
        writer.write(f"Action: Login\r\nActionID: record-login\r\nUsername: {user}\r\n"
                     f"Secret: {secret}\r\nEvents: on\r\n\r\n".encode())
        await writer.drain()
        while True:  # the login's own answer is not recorded (as in testbed/record_ami.py)
            msg = await asyncio.wait_for(reader.readuntil(END), 5)
            if b"ActionID: record-login" in msg:
                if b"Response: Success" not in msg:
                    raise PermissionError(msg.decode(errors="replace"))
                break
        rec = cls(reader, writer)
        rec.task = asyncio.create_task(rec._read(), name="ami-recorder")
        return rec

    async def _read(self) -> None:
        while True:
            raw = await self.reader.readuntil(END)
            self.raw.append(raw)
            self.msgs.extend(split(raw))
            async with self.changed:
                self.changed.notify_all()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await self.task
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()

    async def send(self, name: str, **fields: str) -> str:
        self._next += 1
        aid = f"rec-{self._next}"
        lines = [f"Action: {name}", f"ActionID: {aid}", *(f"{k}: {v}" for k, v in fields.items())]
        self.writer.write(("\r\n".join(lines)).encode() + END)
        await self.writer.drain()
        return aid

    async def action(self, name: str, within: float = 10, **fields: str) -> Message:
        aid = await self.send(name, **fields)
        return await self.wait(lambda m: "Response" in m and m.get("ActionID") == aid, within,
                               f"the answer to {name}")

    async def wait(self, match: Callable[[Message], bool], within: float = 10,
                   what: str = "an event", start: int = 0) -> Message:
        """The first message from index ``start`` on that matches (already seen or coming)."""
        async def find() -> Message:
            i = start
            while True:
                while i < len(self.msgs):
                    if match(self.msgs[i]):
                        return self.msgs[i]
                    i += 1
                async with self.changed:
                    await self.changed.wait()

        try:
            return await asyncio.wait_for(find(), within)
        except TimeoutError:
            raise AssertionError(f"timed out after {within} s waiting for {what}") from None

    async def quiet(self, seconds: float = 0.5, within: float = 5.0) -> None:
        """Until nothing has arrived for ``seconds`` (at most ``within``): the tail of the
        call's events (Cdr, the last VarSets) is in the file."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            count = len(self.raw)
            await asyncio.sleep(seconds)
            if len(self.raw) == count:
                return

    def save(self, path: Path) -> None:
        path.write_bytes(b"".join(self.raw))


def event(name: str, **fields: str) -> Callable[[Message], bool]:
    return lambda m: m.get("Event") == name and all(m.get(k) == v for k, v in fields.items())


# ------------------------------------------------------------------------------ the bench


class LogWatch(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@dataclass
class Placed:
    ref: str
    account: str
    number: str
    rate: Rate
    caller: str = ""  # the Originate's own (;1) channel: hanging it up is the caller hanging up


@dataclass
class Bench:
    pbx: Pbx
    redis: RedisServer
    settings: Settings
    store: Store
    watch: LogWatch
    rec: Recorder | None = None
    ami: tuple[asyncio.Event, asyncio.Task[None]] | None = None
    counter: int = 0
    epoch: int = field(default_factory=lambda: int(time.time()))

    async def wait_log(self, text: str, start: int, within: float = 15) -> None:
        deadline = time.monotonic() + within
        while not any(text in line for line in self.watch.lines[start:]):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for the log line {text!r}")
            await asyncio.sleep(0.05)

    async def start_listener(self) -> None:
        assert self.ami is None
        mark = len(self.watch.lines)
        stop = asyncio.Event()
        task = asyncio.create_task(run_services(self.settings, ["ami"], stop), name="rec-ami")
        self.ami = (stop, task)
        await self.wait_log("AMI connected to", mark)

    async def stop_listener(self) -> None:
        assert self.ami is not None
        stop, task = self.ami
        self.ami = None
        stop.set()
        await asyncio.wait_for(task, 15)

    async def account(self, name: str, balance: int) -> None:
        await self.store.ledger.create_account(name, currency="EUR")
        if balance:
            await self.store.ledger.credit(name, balance, key=f"open:{name}",
                                           ref="opening balance")

    async def originate(self, number: str, account: str, *, wait: int = 300,
                        timeout_ms: int = 30_000) -> Placed:
        """Originate ``Local/<number>@prepaid-outbound`` as ``account``; the ;1 side (the
        caller's phone) runs ``Wait(wait)`` once answered."""
        assert self.rec is not None
        self.counter += 1
        ref = f"{self.epoch}.{900 + self.counter}"
        resp = await self.rec.action(
            "Originate", Channel=f"Local/{number}@prepaid-outbound", Application="Wait",
            Data=str(wait), CallerID=f'"{account}" <{account}>', Async="true",
            Timeout=str(timeout_ms), ChannelId=f"caller-{ref}", OtherChannelId=ref)
        if resp.get("Response") != "Success":
            raise AssertionError(f"Originate refused: {resp}")
        return Placed(ref, account, number, DECK.lookup(number, NORM))

    async def allowed(self, call: Placed) -> None:
        assert self.rec is not None
        status = await self.rec.wait(event("VarSet", Uniqueid=call.ref,
                                           Variable="PREPAID_STATUS"), 10, "PREPAID_STATUS")
        if status.get("Value") != "ALLOWED":
            raise AssertionError(f"call {call.ref} not allowed: {status}")
        new = await self.rec.wait(event("Newchannel", Uniqueid=f"caller-{call.ref}"), 5)
        call.caller = new["Channel"]

    async def answered(self, call: Placed, within: float = 10) -> Message:
        assert self.rec is not None
        return await self.rec.wait(event("DialEnd", Uniqueid=call.ref, DialStatus="ANSWER"),
                                   within, f"{call.ref} answered")

    async def ended(self, call: Placed, within: float = 20) -> None:
        """The caller channel's Hangup and Cdr, then metering's settlement (if it runs)."""
        assert self.rec is not None
        await self.rec.wait(event("Hangup", Uniqueid=call.ref), within, f"{call.ref} hangup")
        await self.rec.wait(event("Cdr", UniqueID=call.ref), 10, f"{call.ref} Cdr")
        if self.ami is not None:
            deadline = time.monotonic() + 10
            while await self.store.redis.hget(record_key("prepaid", call.ref),
                                              "state") != b"ended":
                if time.monotonic() > deadline:
                    raise AssertionError(f"call {call.ref} not settled by the listener")
                await asyncio.sleep(0.05)

    async def idle(self) -> None:
        """No channel left (the warning's ChanSpy too), then the last events are in."""
        assert self.rec is not None
        deadline = time.monotonic() + 15
        while True:
            aid = await self.rec.send("CoreShowChannels")
            done = await self.rec.wait(event("CoreShowChannelsComplete", ActionID=aid), 5)
            if done.get("ListItems") == "0":
                break
            if time.monotonic() > deadline:
                raise AssertionError("channels still up after the scenario")
            await asyncio.sleep(0.1)
        await self.rec.quiet()

    async def paid(self, call: Placed, kind: str = "settle") -> bool:
        return any(e.kind == kind and call.ref in e.ref
                   for e in await self.store.ledger.history(call.account, 100))

    async def until(self, check: Callable[[], Awaitable[bool]], what: str,
                    within: float = 10) -> None:
        deadline = time.monotonic() + within
        while not await check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {within} s waiting for {what}")
            await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------ scenarios


@dataclass
class Outcome:
    calls: list[Placed]
    accounts: dict[str, int]  # opening balances
    notes: dict[str, Any] = field(default_factory=dict)


async def answered_caller_hangs_up(b: Bench) -> Outcome:
    await b.account("2001", 10 * EUR)
    call = await b.originate("00390612345678", "2001", wait=4)  # the caller's Wait(4)
    await b.allowed(call)
    await b.answered(call)
    await b.ended(call)
    return Outcome([call], {"2001": 10 * EUR}, {"answered": True})


async def answered_callee_hangs_up(b: Bench) -> Outcome:
    await b.account("2002", 10 * EUR)
    call = await b.originate("00880312345", "2002")  # the far end hangs up after 3 s
    await b.allowed(call)
    await b.answered(call)
    await b.ended(call)
    return Outcome([call], {"2002": 10 * EUR}, {"answered": True})


async def ringing_caller_abandons(b: Bench) -> Outcome:
    await b.account("2003", 10 * EUR)
    # The far end rings forever; the Originate gives up after 4 s: the caller abandons.
    call = await b.originate("00493012345678", "2003", timeout_ms=4000)
    await b.allowed(call)
    await b.ended(call)
    return Outcome([call], {"2003": 10 * EUR}, {"answered": False})


async def busy(b: Bench) -> Outcome:
    await b.account("2004", 10 * EUR)
    call = await b.originate("0033140000000", "2004")
    await b.allowed(call)
    await b.ended(call)
    return Outcome([call], {"2004": 10 * EUR}, {"answered": False})


async def cutoff_for_credit(b: Bench) -> Outcome:
    # 3.05: the connect fee and 3 seconds; the far end stays up, the listener hangs up.
    opening = 3 * EUR + 50_000
    await b.account("2005", opening)
    call = await b.originate("00390612345678", "2005")
    await b.allowed(call)
    await b.answered(call)
    await b.ended(call, within=15)
    return Outcome([call], {"2005": opening}, {"answered": True, "cutoff": True})


async def parallel_calls(b: Bench) -> Outcome:
    await b.account("2006", 10 * EUR)
    first = await b.originate("00880312345", "2006")  # hangs up after 3 s
    second = await b.originate("00880412345", "2006")  # after 4 s
    for call in (first, second):
        await b.allowed(call)
    for call in (first, second):
        await b.answered(call)
    for call in (first, second):
        await b.ended(call)
    return Outcome([first, second], {"2006": 10 * EUR}, {"answered": True})


async def blind_transfer(b: Bench) -> Outcome:
    assert b.rec is not None
    await b.account("2007", 10 * EUR)
    await b.account("2008", 10 * EUR)  # a bystander: must never be charged
    call = await b.originate("00390612345678", "2007")
    await b.allowed(call)
    answer = await b.answered(call)
    far = answer["DestChannel"]  # the trunk side bridged with the caller
    await b.until(lambda: b.paid(call, "debit"), "block 2 paid")
    # The far end blind-transfers the caller to another number of the test bed, which
    # answers and hangs up after 2 s.
    resp = await b.rec.action("BlindTransfer", Channel=far, Context="testbed-trunk",
                              Exten="0088021234")
    if resp.get("Response") != "Success":
        raise AssertionError(f"BlindTransfer refused: {resp}")
    await b.ended(call)
    return Outcome([call], {"2007": 10 * EUR, "2008": 10 * EUR},
                   {"answered": True, "transferred_by": far,
                    "transferred_to": "0088021234@testbed-trunk"})


async def listener_restart(b: Bench) -> Outcome:
    assert b.rec is not None
    await b.account("2009", 10 * EUR)
    call = await b.originate("00880512345", "2009")  # hangs up after 5 s
    await b.allowed(call)
    await b.answered(call)
    await b.until(lambda: b.paid(call, "debit"), "block 2 paid")
    await b.stop_listener()
    split_at = len(b.rec.raw)  # the messages the first listener could have seen
    await b.start_listener()
    resumed_at = len(b.rec.raw)
    await b.ended(call)
    return Outcome([call], {"2009": 10 * EUR},
                   {"answered": True, "listener_stopped_after": split_at,
                    "listener_back_after": resumed_at})


SCENARIOS: dict[str, tuple[Callable[[Bench], Awaitable[Outcome]], str]] = {
    "answered-caller-hangs-up": (answered_caller_hangs_up,
                                 "answered; the caller hangs up after 4 s (Wait(4))"),
    "answered-callee-hangs-up": (answered_callee_hangs_up,
                                 "answered; the far end hangs up after 3 s"),
    "ringing-caller-abandons": (ringing_caller_abandons,
                                "the far end rings; the caller gives up after 4 s"),
    "busy": (busy, "the far end is busy"),
    "cutoff-for-credit": (cutoff_for_credit,
                          "credit for 3 s; the listener warns and hangs up the caller"),
    "parallel-calls": (parallel_calls,
                       "two calls of one account at once; far ends hang up after 3 and 4 s"),
    "blind-transfer": (blind_transfer,
                       "answered; the far end blind-transfers the caller (AMI BlindTransfer) "
                       "to 0088021234@testbed-trunk, which hangs up after 2 s"),
    "listener-restart": (listener_restart,
                         "answered; the AMI listener is stopped after block 2 and started "
                         "again; the far end hangs up after 5 s"),
}


async def live_result(b: Bench, outcome: Outcome) -> dict[str, Any]:
    """What the live run charged, per call and per account."""
    assert b.rec is not None
    ledger = b.store.ledger
    calls = []
    for call in outcome.calls:
        history = await ledger.history(call.account, 1000)
        spent = -sum(e.amount for e in history if call.ref in e.ref and e.kind != "reserve")
        rows: list[tuple[bytes, dict[bytes, bytes]]] = cast(
            Any, await b.store.redis.xrange(calls_key(ledger, call.account)))
        logged = [{k.decode(): v.decode() for k, v in f.items()} for _, f in rows]
        mine = [r for r in logged if r.get("ref") == call.ref]
        cdrs = [m for m in b.rec.msgs if m.get("Event") == "Cdr"
                and m.get("UniqueID") == call.ref]
        dial = [m for m in b.rec.msgs if m.get("Event") == "DialBegin"
                and m.get("Uniqueid") == call.ref]
        calls.append({
            "ref": call.ref, "account": call.account, "number": call.number,
            "channel": dial[0]["Channel"] if dial else "", "caller_channel": call.caller,
            "rate": dataclasses.asdict(call.rate), "rate_row": rate_row(call.rate),
            "hold": block_cost(call.rate, 1),
            "cdr": [{"disposition": m.get("Disposition", ""),
                     "billable_seconds": int(m.get("BillableSeconds", "0") or 0),
                     "last_application": m.get("LastApplication", "")} for m in cdrs],
            "live": {"charged": spent, "settlement": mine[0] if mine else None},
        })
    accounts = {}
    for name, opening in outcome.accounts.items():
        acct = await ledger.get(name)
        accounts[name] = {"opening": opening, "balance": acct.balance, "held": acct.held}
    return {"calls": calls, "accounts": accounts}


async def record_one(b: Bench, name: str, out: Path) -> None:
    run, description = SCENARIOS[name]
    b.rec = await Recorder.connect(b.pbx.ami_port, b.pbx.ami_username, b.pbx.ami_secret)
    try:
        outcome = await run(b)
        await b.idle()
        result = await live_result(b, outcome)
    except BaseException:
        b.rec.save(out / f"{name}.failed.ami")  # for the post-mortem; not a fixture
        raise
    finally:
        await b.rec.close()
    b.rec.save(out / f"{name}.ami")
    meta = {"scenario": name, "description": description,
            "asterisk": b.pbx.cli("core show version").split()[1],
            "dialplan": "asterisk-conf/extensions.conf [prepaid-outbound], test-bed trunk",
            "rates_csv": RATES_CSV, **outcome.notes, **result}
    (out / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("%s: %d messages, live charges %s", name, len(b.rec.raw),
             [c["live"]["charged"] for c in result["calls"]])
    b.rec = None


async def main_async(out: Path, names: list[str]) -> None:
    redis = RedisServer()
    redis.start()
    agi_port = free_port(socket.SOCK_STREAM)
    pbx = Pbx(agi_port=agi_port)
    smtp = SmtpSink(Path(tempfile.mkdtemp(prefix="record-scenarios-mail-"))).start()
    watch = LogWatch()
    logging.getLogger().addHandler(watch)
    stop = asyncio.Event()
    services: asyncio.Task[None] | None = None
    store: Store | None = None
    bench: Bench | None = None
    try:
        await asyncio.to_thread(pbx.start)
        settings = parse({
            "redis": {"url": redis.url, "timeout": 2.0},
            "billing": {"currency": "EUR", "national_prefix": "", "country_code": "",
                        "max_call_seconds": 600},
            "ami": {"host": "127.0.0.1", "port": pbx.ami_port, "username": "prepaid",
                    "secret": _project_secret(), "reconnect_max_seconds": 1.0},
            "agi": {"listen": f"127.0.0.1:{agi_port}"},
            "smtp": {"host": "127.0.0.1", "port": smtp.port, "from": "prepaid@rec.example"},
            "payments": {"gateway": "sandbox"},
        }, "<record_scenarios>", env={})
        store = await open_store(settings)
        await store.rates.replace(DECK)
        mark = len(watch.lines)
        services = asyncio.create_task(run_services(settings, ["agi", "policy"], stop),
                                       name="rec-services")
        bench = Bench(pbx, redis, settings, store, watch)
        await bench.wait_log("FastAGI listening on", mark)
        await bench.start_listener()
        for name in names:
            await record_one(bench, name, out)
    finally:
        if bench is not None and bench.ami is not None:
            await bench.stop_listener()
        stop.set()
        if services is not None:
            await asyncio.wait_for(services, 15)
        if store is not None:
            await store.close()
        logging.getLogger().removeHandler(watch)
        smtp.stop()
        await asyncio.to_thread(pbx.stop)
        redis.cleanup()


def _project_secret() -> str:
    from testbed.pbx import project_ami_user

    user, secret = project_ami_user()
    assert user == "prepaid", user
    return secret


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.record_scenarios", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--only", action="append", choices=sorted(SCENARIOS),
                    help="record only this scenario (repeatable)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    asyncio.run(main_async(args.out, args.only or list(SCENARIOS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
