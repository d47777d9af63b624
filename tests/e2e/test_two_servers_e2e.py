"""Two Asterisk servers on one Redis Cluster: one account, one balance, two calls at once.

Two test-bed Asterisk 22 ("pbx-a" and "pbx-b", each with its own ``systemname``, so every
uniqueid carries it), each with its own ``prepaid serve --only agi --only ami`` process
(FastAGI on its own port, the listener with ``[ami] system_name``), all on one real
3-primary Redis Cluster. One account calls through both servers at the same time; listener
A is SIGKILLed mid-call and started again while B's call goes on.

Nothing sleeps for luck: every wait is for an AMI event, a log line or a Redis state, with
a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ami_listener.meter import calls_key
from prepaid.callrecord import record_key
from prepaid.ledger import Entry
from prepaid.rating import block_cost, cost
from prepaid.store import Store, open_store
from testbed.ami import Ami, Message, event
from testbed.pbx import Pbx, free_port, project_ami_user
from testbed.replies import entries, fields
from testbed.servers import toml_text
from tests.cluster_fixtures import cluster, cluster_settings, cluster_url  # noqa: F401
from tests.conftest import assert_verified
from tests.e2e.test_system_e2e import (
    DECK,
    EUR,
    config_for,
    rate_for,
    serve_process,
    spent,
    until,
)

pytestmark = pytest.mark.pbx

ACCOUNT = "2001"
OPENING = 50 * EUR


@dataclass
class Server:
    """One Asterisk with its own ``prepaid serve`` (FastAGI + AMI listener)."""

    name: str
    pbx: Pbx
    ami: Ami
    agi_port: int
    config: Path
    log: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.procs[-1]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def start_serve(self) -> subprocess.Popen[bytes]:
        """Start ``prepaid serve``; back once FastAGI accepts and the metering user has
        logged in to this Asterisk."""
        pbx_mark = len(self.pbx.log_text())
        log_mark = len(self.log_text())
        proc = serve_process(self.config, ["agi", "ami"], self.log)
        self.procs.append(proc)
        user, _ = project_ami_user()
        await asyncio.to_thread(self.pbx.wait_for_log, f"Manager '{user}' logged on", 20,
                                pbx_mark)

        async def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{self.name}: prepaid serve exited {proc.returncode}\n"
                                     + self.log_text()[-3000:])
            return "FastAGI listening on" in self.log_text()[log_mark:]

        await until(listening, f"{self.name}: FastAGI listening", 20)
        return proc

    async def kill_serve(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        await asyncio.to_thread(self.proc.wait, 10)

    async def originate(self, number: str, account: str) -> Call:
        """Originate ``Local/<number>@prepaid-outbound`` with ``account`` as caller id. No
        channel ids are given, so Asterisk makes the uniqueids (with its systemname); the
        call reference the AGI gives is found by the call's unique caller-id name."""
        tag = f"t{secrets.token_hex(5)}"
        resp = await self.ami.action(
            "Originate", Channel=f"Local/{number}@prepaid-outbound", Application="Wait",
            Data="300", CallerID=f'"{tag}" <{account}>', Account=account, Async="true",
            Timeout="30000")
        assert resp["Response"] == "Success", resp
        ref = await self.ami.wait_event(
            event("VarSet", Variable="^PREPAID_CALLREF$", CallerIDName=f"^{tag}$"), 10)
        return Call(self, ref["Value"], account, number)

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.to_thread(proc.wait, 15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    await asyncio.to_thread(proc.wait, 5)
        await self.ami.close()


@dataclass
class Call:
    server: Server
    ref: str
    account: str
    number: str
    answered: Message | None = None
    hangup: Message | None = None
    cdr: Message | None = None

    async def status(self) -> tuple[str, str]:
        ami = self.server.ami
        status = await ami.wait_event(
            event("VarSet", Uniqueid=f"^{re.escape(self.ref)}$", Variable="^PREPAID_STATUS$"))
        reason = await ami.wait_event(
            event("VarSet", Uniqueid=f"^{re.escape(self.ref)}$", Variable="^PREPAID_REASON$"))
        return status["Value"], reason["Value"]

    async def wait_answered(self, within: float = 10) -> Message:
        self.answered = await self.server.ami.wait_event(
            event("DialEnd", Uniqueid=f"^{re.escape(self.ref)}$", DialStatus="^ANSWER$"),
            within)
        return self.answered

    async def wait_ended(self, within: float = 30) -> None:
        ami = self.server.ami
        self.hangup = await ami.wait_event(
            event("Hangup", Uniqueid=f"^{re.escape(self.ref)}$"), within)
        self.cdr = await ami.wait_event(
            lambda m: m.get("Event") == "Cdr" and m.get("UniqueID") == self.ref
            and m.get("LastApplication") == "Dial", 10)

    def is_up(self) -> bool:
        return not any(m.get("Event") == "Hangup" and m.get("Uniqueid") == self.ref
                       for m in self.server.ami.seen)

    @property
    def billsec(self) -> int:
        assert self.cdr is not None
        return int(self.cdr["BillableSeconds"])

    @property
    def talk_seconds(self) -> float:
        assert self.answered is not None and self.hangup is not None
        return float(self.hangup["Timestamp"]) - float(self.answered["Timestamp"])


async def settled(store: Store, ref: str, within: float = 15) -> dict[str, str]:
    async def check() -> dict[str, str] | None:
        h = fields(await store.redis.hgetall(record_key("prepaid", ref)))
        return h if h.get("state") in ("ended", "released") else None

    return await until(check, f"call {ref} settled by metering", within)


async def settlement(store: Store, account: str, ref: str) -> dict[str, str]:
    rows = entries(await store.redis.xrange(calls_key(store.ledger, account)))
    found = [f for _, f in rows]
    mine = [f for f in found if f.get("ref") == ref]
    assert len(mine) == 1, f"call {ref} logged {len(mine)} times: {found}"
    return mine[0]


async def ledger_rows(store: Store, account: str) -> list[dict[str, str]]:
    """The account's ledger history stream as written (kind, amount, key, ref, ...)."""
    return [f for _, f in entries(await store.redis.xrange(store.ledger.keys(account)[2]))]


def describe(history: list[Entry]) -> str:
    return "\n".join(f"{e.kind:8} {e.amount:>10} -> {e.balance:>10} held {e.held:>8} {e.ref}"
                     for e in reversed(history))


@dataclass
class Bed:
    store: Store
    servers: dict[str, Server]


@pytest.fixture
async def bed(make_pbx: Callable[..., Pbx], cluster_url: str,  # noqa: F811
              tmp_path: Path) -> AsyncIterator[Bed]:
    store = await open_store(cluster_settings(cluster_url))
    await store.rates.replace(DECK)
    servers: dict[str, Server] = {}
    try:
        for name in ("pbx-a", "pbx-b"):
            agi_port = free_port(socket.SOCK_STREAM)
            pbx = make_pbx(agi_port=agi_port, system_name=name)
            data = config_for(cluster_url, pbx, agi_port, free_port(socket.SOCK_STREAM),
                              ami={"system_name": name})
            config = tmp_path / f"{name}.toml"
            config.write_text(toml_text(data))
            config.chmod(0o600)  # it holds the AMI secret
            ami = await Ami.connect(pbx.ami_port, pbx.ami_username, pbx.ami_secret)
            servers[name] = Server(name, pbx, ami, agi_port, config, tmp_path / f"{name}.log")
        await asyncio.gather(*(s.start_serve() for s in servers.values()))
        yield Bed(store, servers)
        await assert_verified(store.ledger)  # the scenario left no mismatch (issue 13)
    finally:
        for server in servers.values():
            await server.stop()
        await store.close()


async def test_one_account_calls_through_two_servers_and_a_listener_restarts(
        bed: Bed) -> None:
    ledger = bed.store.ledger
    a, b = bed.servers["pbx-a"], bed.servers["pbx-b"]
    await ledger.create_account(ACCOUNT, currency="EUR")
    await ledger.credit(ACCOUNT, OPENING, key=f"seed:{ACCOUNT}", ref="e2e seed")

    # A: the far end hangs up after 10 s; B: after 14 s (it outlives A's restart).
    call_a, call_b = await asyncio.gather(a.originate("00881012345", ACCOUNT),
                                          b.originate("00881412345", ACCOUNT))
    assert re.fullmatch(r"pbx-a-\d+\.\d+", call_a.ref), call_a.ref
    assert re.fullmatch(r"pbx-b-\d+\.\d+", call_b.ref), call_b.ref
    for call in (call_a, call_b):
        assert await call.status() == ("ALLOWED", "")
    # Both authorized against the one balance: a hold each, on the one account.
    reserves = [r["key"] for r in await ledger_rows(bed.store, ACCOUNT)
                if r["kind"] == "reserve"]
    assert sorted(reserves) == sorted([f"auth:{call_a.ref}", f"auth:{call_b.ref}"])
    await asyncio.gather(call_a.wait_answered(), call_b.wait_answered())

    async def block_1_paid() -> bool:
        return any(e.kind == "settle" and call_a.ref in e.ref
                   for e in await ledger.history(ACCOUNT, 100))

    await until(block_1_paid, "A's block 1 paid (its hold settled)", 5)

    # Listener A dies and comes back while both calls are up.
    assert call_a.is_up() and call_b.is_up()
    await a.kill_serve()
    mark = len(a.log_text())
    await a.start_serve()

    async def resumed() -> bool:
        return "resuming 1 call(s)" in a.log_text()[mark:]

    await until(resumed, "listener A resuming its one call", 10)
    restarted_log = a.log_text()[mark:]
    assert call_b.ref not in restarted_log, restarted_log
    assert call_b.is_up(), "B's call ended while A restarted"
    record_b = await bed.store.redis.hgetall(record_key("prepaid", call_b.ref))
    assert record_b[b"state"] != b"ended", record_b  # A did not finish B's call

    await asyncio.gather(call_a.wait_ended(), call_b.wait_ended())
    await asyncio.gather(settled(bed.store, call_a.ref), settled(bed.store, call_b.ref))

    # Both calls billed once each, the rate deck's cost of Asterisk's billable seconds.
    acct = await ledger.get(ACCOUNT)
    history = await ledger.history(ACCOUNT, 200)
    for call in (call_a, call_b):
        rate = rate_for(call.number)
        rec = await settlement(bed.store, ACCOUNT, call.ref)
        assert spent(history, call.ref) == cost(rate, call.billsec) == int(rec["cost"]), (
            call.ref, call.billsec, rec, describe(history))
    rows = await ledger_rows(bed.store, ACCOUNT)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), f"an idempotency key applied twice: {keys}"
    for call in (call_a, call_b):
        blocks = [k for k in keys if k.startswith(f"blk:{call.ref}:")]
        assert blocks == [f"blk:{call.ref}:{n}" for n in range(1, len(blocks) + 1)], blocks
    # B's listener saw B's call through, to its Cdr event; A never settled it for B (it
    # would be an estimate).
    assert (await settlement(bed.store, ACCOUNT, call_b.ref))["source"] == "cdr"
    assert 13 <= call_b.talk_seconds <= 15.5, call_b.talk_seconds  # not cut by anyone
    assert (acct.balance, acct.held) == (OPENING - cost(rate_for(call_a.number), call_a.billsec)
                                         - cost(rate_for(call_b.number), call_b.billsec), 0), (
        describe(history))
    assert await ledger.holds(ACCOUNT) == {}
    assert sum(e.amount for e in history) == acct.balance
    assert "resuming 1 call(s)" not in b.log_text()  # B was never restarted
    for server in (a, b):
        assert "has systemname" not in server.log_text()  # names match

    # After every change of the balance (each history entry records the state it left),
    # the holds of both calls together never exceeded it, nor two first blocks.
    over = [e for e in history if e.held > e.balance]
    assert not over, describe(over)
    assert max(e.held for e in history) <= 2 * block_cost(rate_for(call_a.number), 1)
