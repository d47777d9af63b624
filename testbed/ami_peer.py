"""A tiny Asterisk manager for the tests: banner, Login, answers actions, streams recordings.

It speaks the real wire format over TCP.  It keeps the channel table the way Asterisk would
(from the events it has played), so ``CoreShowChannels`` lists the channels still up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ami_listener.meter import CallHistory, Meter, Reporter
from ami_listener.protocol import Message, MessageSplitter, encode, split, timestamp_us
from ami_listener.runners import LiveRunner
from ami_listener.tracker import Settlement
from prepaid import callrecord
from prepaid.callrecord import CallRecord, hold_id
from prepaid.config import AmiSettings
from prepaid.ledger import Ledger
from prepaid.rating import Rate, block_cost

BANNER = b"Asterisk Call Manager/9.0.0\r\n"


def wire(msg: Message) -> bytes:
    return encode(list(msg.items()) + msg.extra)


class AmiPeer:
    def __init__(self, username: str = "prepaid", secret: str = "s3cret") -> None:
        self.username, self.secret = username, secret
        self.actions: list[Message] = []
        self.logins = 0
        self.channels: dict[str, dict[str, str]] = {}  # Uniqueid -> channel table row
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.logged_in = asyncio.Event()
        self.action_seen = asyncio.Event()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        await self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def drop(self) -> None:
        """Close the current connection (Asterisk restarting, link lost)."""
        writer, self._writer = self._writer, None
        self.logged_in.clear()
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            writer.write(BANNER)
            splitter = MessageSplitter()
            while True:
                line = await reader.readline()
                if not line:
                    return
                msg = splitter.line(line)
                if msg is not None:
                    await self._answer(msg, writer)
        except (OSError, asyncio.CancelledError):
            return
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _answer(self, msg: Message, writer: asyncio.StreamWriter) -> None:
        self.actions.append(msg)
        self.action_seen.set()
        name = msg.get("Action", "").lower()
        aid = msg.get("ActionID", "")
        if name == "login":
            ok = msg.get("Username") == self.username and msg.get("Secret") == self.secret
            writer.write(encode([("Response", "Success" if ok else "Error"), ("ActionID", aid),
                                 ("Message", "Authentication accepted" if ok
                                  else "Authentication failed")]))
            if ok:
                self.logins += 1
                self._writer = writer
                self.logged_in.set()
        elif name == "coreshowchannels":
            writer.write(encode([("Response", "Success"), ("ActionID", aid),
                                 ("EventList", "start"),
                                 ("Message", "Channels will follow")]))
            for uid, row in self.channels.items():
                writer.write(encode([("Event", "CoreShowChannel"), ("ActionID", aid),
                                     ("Channel", row["Channel"]), ("Uniqueid", uid),
                                     ("ChannelState", row.get("ChannelState", "6")),
                                     ("BridgeId", row.get("BridgeId", ""))]))
            writer.write(encode([("Event", "CoreShowChannelsComplete"), ("ActionID", aid),
                                 ("EventList", "Complete"),
                                 ("ListItems", str(len(self.channels)))]))
        elif name == "hangup":
            writer.write(encode([("Response", "Success"), ("ActionID", aid),
                                 ("Message", "Channel Hungup")]))
        else:
            writer.write(encode([("Response", "Success"), ("ActionID", aid)]))
        await writer.drain()

    def learn(self, msgs: Iterable[Message]) -> None:
        """Update the channel table as if these events had happened (without sending them)."""
        for msg in msgs:
            event, uid = msg.get("Event", ""), msg.get("Uniqueid", "")
            if not uid:
                continue
            if event == "Newchannel":
                self.channels[uid] = {"Channel": msg.get("Channel", ""),
                                      "ChannelState": msg.get("ChannelState", "0")}
            elif event == "Hangup":
                self.channels.pop(uid, None)
            elif uid in self.channels and event == "BridgeEnter":
                self.channels[uid]["BridgeId"] = msg.get("BridgeUniqueid", "")
            elif uid in self.channels and event == "BridgeLeave":
                self.channels[uid]["BridgeId"] = ""
            elif uid in self.channels and event == "Newstate":
                self.channels[uid]["ChannelState"] = msg.get("ChannelState", "")

    async def play(self, msgs: Iterable[Message]) -> None:
        """Send the events (not the responses) of a recording to the logged-in listener."""
        assert self._writer is not None, "no listener logged in"
        for msg in msgs:
            if "Event" not in msg:
                continue
            self.learn([msg])
            self._writer.write(wire(msg))
        await self._writer.drain()

    def sent(self, name: str) -> list[Message]:
        return [m for m in self.actions if m.get("Action", "").lower() == name.lower()]


# -- recordings and the authorization the AGI would have done ------------------------------

FIXTURES = Path(__file__).resolve().parent / "recordings"
# Recordings through the project's own dialplan (testbed/record_scenarios.py), each with a
# <name>.json beside it saying what a replay needs and what the live run charged.
PROJECT = FIXTURES / "project"
PROJECT_RECORDINGS = sorted(p for p in PROJECT.glob("*.ami") if not p.name.endswith(".failed.ami"))


def _one_call(path: Path) -> bool:
    sidecar = path.with_suffix(".json")
    return not sidecar.exists() or len(json.loads(sidecar.read_text()).get("calls", [])) <= 1


# What the generic tests iterate over: every recording of one prepaid call (they authorize
# the first caller and answer every lookup with it). Recordings of several calls (e.g.
# project/parallel-calls) are replayed by tests/test_ami_scenarios.py with their .json.
RECORDINGS = sorted(p for p in FIXTURES.rglob("*.ami")
                    if not p.name.endswith(".failed.ami") and _one_call(p))
ANSWERED = {"answered-callee-hangs-up", "answered-caller-hangs-up",
            "testbed-answered-callee-hangs-up", "testbed-answered-caller-hangs-up"}
# 0.60/min, 0.05 to connect, billed per second: every second is a block of 0.01.
PER_SECOND = Rate("39", "per second", per_minute=600_000, connect_fee=50_000, initial=1,
                  increment=1)


@dataclass(frozen=True)
class Recording:
    name: str
    messages: list[Message]
    ref: str  # Uniqueid of the channel running Dial: the authorized caller
    channel: str
    number: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)  # the <name>.json

    @property
    def answered(self) -> bool:
        return self.name in ANSWERED if "answered" not in self.meta else bool(
            self.meta["answered"])

    def times(self) -> tuple[int | None, int | None]:
        """Answer (first DialEnd ANSWER of the caller) and hangup of the caller, in us."""
        answer = hangup = None
        for m in self.messages:
            if m.get("Uniqueid") != self.ref:
                continue
            if m.get("Event") == "DialEnd" and m.get("DialStatus") == "ANSWER" and not answer:
                answer = timestamp_us(m["Timestamp"])
            if m.get("Event") == "Hangup":
                hangup = timestamp_us(m["Timestamp"])
        return answer, hangup

    def billed_duration(self) -> int:
        answer, hangup = self.times()
        if answer is None or hangup is None:
            return 0
        return (hangup - answer) // 1_000_000  # whole seconds, as Asterisk's billsec


def load(path: Path) -> Recording:
    msgs = list(split(path.read_bytes()))
    dial = next(m for m in msgs if m.get("Event") == "DialBegin" and m.get("Uniqueid"))
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    return Recording(path.stem, msgs, dial["Uniqueid"], dial["Channel"], dial["Exten"], meta)


async def authorize(ledger: Ledger, ref: str, channel: str, number: str, rate: Rate,
                    account: str = "alice", prefix: str = "prepaid",
                    max_seconds: int = 3600) -> CallRecord:
    """What the AGI does before the Dial: reserve block 1, write the live-call record."""
    hold = block_cost(rate, 1)
    await ledger.reserve(account, hold_id(ref), hold, key=f"auth:{ref}", ref=f"call {ref}")
    record = CallRecord(account=account, number=number, digits=number.lstrip("0"), rate=rate,
                        hold=hold, max_seconds=max_seconds, channel=channel, uniqueid=ref)
    await callrecord.write(ledger.redis, prefix, record)
    return record


async def open_account(ledger: Ledger, balance: int, account: str = "alice") -> None:
    await ledger.create_account(account, currency="EUR")
    if balance:
        await ledger.credit(account, balance, key=f"open:{account}", ref="opening balance")


async def wait_until(condition: Callable[[], Awaitable[bool]], within: float = 5.0,
                     what: str = "condition") -> None:
    """Poll a condition with a deadline (not a sleep for luck)."""
    deadline = asyncio.get_running_loop().time() + within
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.01)


class Sent:
    """AMI actions the meter sent, in order."""

    def __init__(self) -> None:
        self.actions: list[tuple[str, dict[str, str]]] = []

    def send(self, name: str, **headers: str) -> str:
        self.actions.append((name, headers))
        return str(len(self.actions))

    def named(self, name: str) -> list[dict[str, str]]:
        return [h for n, h in self.actions if n == name]


class Recorder:
    """The reporter of tests and benchmarks: keeps every settlement, after passing it on to
    ``then`` (the call history, so Redis is as in production) unless that is None."""

    def __init__(self, then: Reporter | None = None) -> None:
        self.then = then
        self.settlements: list[Settlement] = []

    async def settled(self, settlement: Settlement) -> None:
        if self.then is not None:
            await self.then.settled(settlement)
        self.settlements.append(settlement)


def recording_meter(ledger: Ledger, **options: Any) -> tuple[Meter, Recorder]:
    """A meter whose settlements go to the call history and to a recorder."""
    recorder = Recorder(CallHistory(ledger, options.get("prefix", "prepaid")))
    return Meter(ledger, reporter=recorder, **options), recorder


class Listener:
    """A LiveRunner task the test starts and stops (as ``prepaid serve`` would)."""

    def __init__(self, ledger: Ledger, peer: AmiPeer) -> None:
        self.meter = Meter(ledger)
        settings = AmiSettings(host="127.0.0.1", port=peer.port, username="prepaid",
                               secret="s3cret", reconnect_max_seconds=0.2)
        self.runner = LiveRunner(self.meter, settings, tick=0.02, min_backoff=0.02)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Listener:
        self.task = asyncio.create_task(self.runner.run(self.stop))
        async with asyncio.timeout(5):
            await self.runner.connected.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        async with asyncio.timeout(5):
            await self.task  # clean shutdown; re-raises anything the runner hit
