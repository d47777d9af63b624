"""Running at scale, measured: two Asterisk servers on one Redis Cluster.

Two test-bed Asterisk 22 ("pbx-a", "pbx-b", each with its own ``systemname``), each with its
own ``prepaid serve --only agi --only ami`` (FastAGI on its own port, the listener with
``[ami] system_name``), on one Redis Cluster of 3 primaries with a replica each (node
timeout 1 s). ``CALLS`` short calls (``CALL_SECONDS`` s, 1/1 billing) are placed by AMI
Originate on both servers at once, at ``RATE_PER_SERVER`` calls a second each with at most
``MAX_CONCURRENT`` up per server, over ``ACCOUNTS`` accounts. When half the calls are placed,
the primary that owns the probe account's slot is killed with SIGKILL.

Figures:

- completed calls a second across both servers (completed calls over the time from the first
  call placed to the last one settled; and the rate at which they settled, first to last):
  calls authorized, metered and settled, each checked in Redis (its record ended, its
  settlement logged once, every block key in the account's ledger history once, the charge
  the rate deck's cost of the call's seconds);
- authorization latency p50/p99, as Asterisk saw it (AGI() starting to PREPAID_STATUS set,
  AMI event timestamps; over all allowed calls and over those authorized outside the
  failover, from the kill to the cluster healthy again) and
  as the FastAGI server logs it;
- the failover: the longest pause a ledger client saw (a probe crediting 1 micro-unit every
  20 ms to an account on the killed primary), when the cluster was healthy again, calls
  refused while it failed over, and what was lost: probe credits acknowledged but not in
  the history, and acknowledged ledger changes of the calls (an ALLOWED call's reservation,
  a settled call's blocks) missing from the history.

Run with ``python -m bench scale``; needs root (Asterisk runs chrooted), else it is skipped.
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
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import percentile
from prepaid import keys
from prepaid.errors import StoreUnavailable
from prepaid.ledger import Ledger
from prepaid.ratedeck import Normalisation, parse_csv
from prepaid.ratestore import RateStore
from prepaid.rating import cost
from prepaid.redis_client import REDIS_ERRORS, RedisClient, connect
from testbed.ami import Ami, Message
from testbed.cluster import Cluster, ClusterUnsupported
from testbed.pbx import Pbx, free_port, pbx_unavailable_reason, project_ami_user
from testbed.replies import entries

SERVERS = ("pbx-a", "pbx-b")
CALLS = 60  # in all, half on each server
RATE_PER_SERVER = 3.0  # calls offered a second on each server
MAX_CONCURRENT = 10  # calls up at once on each server, at most
CALL_SECONDS = 2  # the test-bed trunk answers 0088NN... and hangs up after NN s
ACCOUNTS = 12
OPENING = 100_000_000  # 100.00 each
KILL_AFTER = CALLS // 2  # calls placed before the primary is killed
PROBE_EVERY = 0.02
RATES = """\
prefix,name,price_per_minute,connect_fee,initial_increment,increment
88,Bench trunk 1/1,6.00,0,1,1
"""
DECK = parse_csv(RATES, "scale-rates.csv")
NORM = Normalisation(("+", "00"), "", "")
NUMBER = f"0088{CALL_SECONDS:02d}123456"
AGI_LOG = re.compile(r"agi\.routes: call (\S+) account .*: (\w+) .*\((\d+) ms\)")


class Events:
    """Indexes one Asterisk's AMI events by uniqueid and lets calls wait on them."""

    def __init__(self, ami: Ami) -> None:
        self.ami = ami
        self.by_uid: dict[str, list[Message]] = defaultdict(list)
        self.uid_of_tag: dict[str, str] = {}
        self._waiters: dict[str, list[tuple[Callable[[Message], bool],
                                            asyncio.Future[Message]]]] = defaultdict(list)
        self._tag_waiters: dict[str, asyncio.Future[str]] = {}
        self._task = asyncio.create_task(self._consume(), name="bench-scale-events")

    async def _consume(self) -> None:
        while True:
            msg = await self.ami.events.get()
            uid = msg.get("Uniqueid") or msg.get("UniqueID") or ""
            if not uid:
                continue
            self.by_uid[uid].append(msg)
            tag = msg.get("CallerIDName", "")
            # The dialplan half (;2) of the originated Local channel runs prepaid-outbound.
            if (tag.startswith("sc") and tag not in self.uid_of_tag
                    and msg.get("Event") == "Newexten" and msg.get("Channel", "").endswith(";2")
                    and msg.get("Context") == "prepaid-outbound"):
                self.uid_of_tag[tag] = uid
                fut = self._tag_waiters.pop(tag, None)
                if fut is not None and not fut.done():
                    fut.set_result(uid)
            waiting = self._waiters.get(uid, [])
            for item in list(waiting):
                match, got = item
                if match(msg):
                    waiting.remove(item)
                    if not got.done():
                        got.set_result(msg)

    async def uid(self, tag: str, within: float) -> str:
        if tag in self.uid_of_tag:
            return self.uid_of_tag[tag]
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._tag_waiters[tag] = fut
        return await asyncio.wait_for(fut, within)

    async def wait(self, uid: str, match: Callable[[Message], bool], within: float) -> Message:
        for msg in self.by_uid.get(uid, []):
            if match(msg):
                return msg
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiters[uid].append((match, fut))
        return await asyncio.wait_for(fut, within)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.ami.close()


def is_event(name: str, **fields: str) -> Callable[[Message], bool]:
    return lambda m: m.get("Event") == name and all(m.get(k) == v for k, v in fields.items())


@dataclass
class Server:
    name: str
    pbx: Pbx
    agi_port: int
    config: Path
    log: Path
    serve: subprocess.Popen[bytes] | None = None
    events: Events | None = None
    up: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_CONCURRENT))
    in_flight: int = 0
    max_in_flight: int = 0


@dataclass
class CallResult:
    server: str
    account: str
    tag: str
    placed: float  # monotonic
    uid: str = ""
    status: str = ""
    reason: str = ""
    auth_ms: float | None = None
    auth_span: tuple[float, float] | None = None  # Asterisk's clock (unix time)
    billsec: int | None = None
    settled_at: float | None = None
    error: str = ""


class Rig:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.cluster = Cluster(primaries=3, replicas=1, node_timeout_ms=1000)
        self.servers: list[Server] = []
        self.env = dict(os.environ)

    def start(self) -> None:
        self.cluster.start()
        user, secret = project_ami_user()
        self.env["PREPAID_AMI_SECRET"] = secret
        for name in SERVERS:
            agi_port = free_port(socket.SOCK_STREAM)
            pbx = Pbx(agi_port=agi_port, system_name=name)
            self.servers.append(Server(name, pbx, agi_port, self.work / f"{name}.toml",
                                       self.work / f"{name}.log"))
            pbx.start()
            server = self.servers[-1]
            server.config.write_text(
                f'[redis]\nurl = "{self.cluster.url}"\n'
                '[billing]\ncurrency = "EUR"\nnational_prefix = ""\n'
                f'[ami]\nport = {pbx.ami_port}\nusername = "{user}"\n'
                f'system_name = "{name}"\nreconnect_max_seconds = 1.0\n'
                f'[agi]\nlisten = "127.0.0.1:{agi_port}"\n'
                f'[smtp]\nport = {free_port()}\n')
            server.config.chmod(0o600)
        for server in self.servers:
            with server.log.open("wb") as out:
                server.serve = subprocess.Popen(
                    [str(Path(sys.executable).parent / "prepaid"), "--config",
                     str(server.config), "serve", "--only", "agi", "--only", "ami"],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=self.env, start_new_session=True)
        for server in self.servers:
            assert server.serve is not None
            server.pbx.wait_for_log(r"Manager '" + user + "' logged on", timeout=20)
            deadline = time.monotonic() + 20
            while "FastAGI listening on" not in server.log.read_text(errors="replace"):
                if time.monotonic() > deadline or server.serve.poll() is not None:
                    raise RuntimeError(f"{server.name}: prepaid serve did not come up:\n"
                                       + server.log.read_text(errors="replace")[-2000:])
                time.sleep(0.05)  # polling a log with a deadline

    def stop(self) -> None:
        for server in self.servers:
            proc = server.serve
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
            server.pbx.stop()
        self.cluster.cleanup()


RETRIED: tuple[type[Exception], ...] = (StoreUnavailable, *REDIS_ERRORS)


async def retry(what: str, op: Callable[[], Any], within: float = 30.0) -> Any:
    """The bench's own Redis reads ride out the failover: retry while the store is down."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await op()
        except RETRIED:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: Redis unavailable for {within} s") from None
            await asyncio.sleep(0.05)  # back-off between retries


async def one_call(server: Server, account: str, client: RedisClient) -> CallResult:
    assert server.events is not None
    events = server.events
    tag = f"sc{secrets.token_hex(5)}"
    result = CallResult(server.name, account, tag, time.monotonic())
    step = "Originate"
    async with server.up:
        server.in_flight += 1
        server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            resp = await events.ami.action(
                "Originate", Channel=f"Local/{NUMBER}@prepaid-outbound", Application="Wait",
                Data="60", CallerID=f'"{tag}" <{account}>', Async="true", Timeout="30000")
            if resp.get("Response") != "Success":
                raise RuntimeError(f"Originate refused: {resp}")
            step = "its uniqueid"
            uid = result.uid = await events.uid(tag, 15)
            step = "AGI() starting"
            agi = await events.wait(uid, is_event("Newexten", Application="AGI"), 15)
            step = "PREPAID_STATUS"
            status = await events.wait(uid, is_event("VarSet", Variable="PREPAID_STATUS"), 15)
            reason = await events.wait(uid, is_event("VarSet", Variable="PREPAID_REASON"), 15)
            result.status, result.reason = status["Value"], reason["Value"]
            result.auth_span = (float(agi["Timestamp"]), float(status["Timestamp"]))
            result.auth_ms = 1000 * (result.auth_span[1] - result.auth_span[0])
            step = "its hangup"
            await events.wait(uid, is_event("Hangup"), CALL_SECONDS + 30)
            if result.status != "ALLOWED":
                return result
            step = "its CDR"
            cdr = await events.wait(uid, is_event("Cdr", LastApplication="Dial"), 15)
            result.billsec = int(cdr["BillableSeconds"])
        except TimeoutError:
            result.error = f"timed out waiting for {step}"
        except RuntimeError as exc:
            result.error = str(exc)
            return result
        finally:
            server.in_flight -= 1
    key = keys.call_record("prepaid", result.uid)
    deadline = time.monotonic() + 30
    while True:  # metering settles the call: its record's state becomes 'ended'
        with contextlib.suppress(StoreUnavailable, *REDIS_ERRORS):
            if await client.hget(key, "state") == b"ended":
                result.settled_at = time.monotonic()
                return result
        if time.monotonic() > deadline:
            result.error = "not settled within 30 s"
            return result
        await asyncio.sleep(0.05)  # polling Redis with a deadline


@dataclass
class Probe:
    """Credits 1 micro-unit every PROBE_EVERY s to an account on the primary to be killed."""

    ledger: Ledger
    account: str
    acknowledged: set[str] = field(default_factory=set)
    acked_at: list[float] = field(default_factory=list)  # monotonic
    killed_at: float | None = None  # monotonic
    killed_wall: float = 0.0
    healthy_wall: float = 0.0
    failures: int = 0

    def pause(self) -> float:
        """The longest a ledger write waited for the ledger around the kill: the widest
        gap between two acknowledged probe writes from just before the kill on."""
        assert self.killed_at is not None
        times = [t for t in self.acked_at if t >= self.killed_at - 1.0]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)

    async def run(self, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            key = f"probe:{n}"
            while not stop.is_set():  # the same key until the ledger answers
                try:
                    await self.ledger.credit(self.account, 1, key=key, ref="bench probe")
                    self.acknowledged.add(key)
                    self.acked_at.append(time.monotonic())
                    break
                except StoreUnavailable:
                    self.failures += 1
                    await asyncio.sleep(PROBE_EVERY)  # back-off between retries
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PROBE_EVERY)


async def _run(rig: Rig) -> dict[str, Any]:
    client = connect(rig.cluster.url, timeout=0.5)
    ledger = Ledger(client, url=rig.cluster.url)
    rate = DECK.lookup(NUMBER, NORM)
    accounts = [f"sc{i:02d}" for i in range(ACCOUNTS)]
    for acct in [*accounts, "probe"]:
        await ledger.create_account(acct, currency="EUR")
        await ledger.credit(acct, OPENING, key=f"seed:{acct}", ref="bench seed")
    await RateStore(client, "prepaid").replace(DECK)
    victim = rig.cluster.node_for_key(ledger.account_key("probe"))
    on_victim = sum(1 for a in accounts
                    if rig.cluster.node_for_key(ledger.account_key(a)) is victim)
    for server in rig.servers:
        ami = await Ami.connect(server.pbx.ami_port, server.pbx.ami_username,
                                server.pbx.ami_secret)
        server.events = Events(ami)
    probe = Probe(ledger, "probe")
    stop_probe = asyncio.Event()
    probe_task = asyncio.create_task(probe.run(stop_probe), name="bench-scale-probe")
    heal: asyncio.Task[float] | None = None
    tasks: list[asyncio.Task[CallResult]] = []
    halfway = asyncio.Event()
    started = time.monotonic()
    try:
        async def offer(server: Server, index: int) -> None:
            per_server = CALLS // len(rig.servers)
            for k in range(per_server):
                due = started + k / RATE_PER_SERVER
                await asyncio.sleep(max(0.0, due - time.monotonic()))  # the offered rate
                account = accounts[(k * len(rig.servers) + index) % len(accounts)]
                tasks.append(asyncio.create_task(one_call(server, account, client),
                                                 name=f"bench-call-{server.name}-{k}"))
                if len(tasks) >= KILL_AFTER:
                    halfway.set()

        async def kill_midway() -> float:
            await halfway.wait()
            probe.killed_at, probe.killed_wall = time.monotonic(), time.time()
            await asyncio.to_thread(rig.cluster.kill, victim)
            took = await asyncio.to_thread(rig.cluster.wait_healthy, 60.0)
            probe.healthy_wall = time.time()
            return took

        heal = asyncio.create_task(kill_midway(), name="bench-scale-kill")
        await asyncio.gather(*(offer(s, i) for i, s in enumerate(rig.servers)))
        offer_seconds = time.monotonic() - started
        results = await asyncio.gather(*tasks)
        heal_wait = await heal
    finally:
        stop_probe.set()
        await probe_task
        if heal is not None and not heal.done():
            heal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heal
        for task in tasks:
            task.cancel()
        for server in rig.servers:
            if server.events is not None:
                await server.events.close()
    assert probe.killed_at is not None

    # What the ledger holds, checked call by call.
    lost_reserves = lost_blocks = wrong_charge = not_logged = 0
    completed: list[CallResult] = []
    history: dict[str, list[dict[str, str]]] = {}
    for acct in [*accounts, "probe"]:
        raw = await retry("history", partial(client.xrange, ledger.keys(acct)[2]))
        history[acct] = [f for _, f in entries(raw)]
        bal = (await retry("account", partial(ledger.get, acct))).balance
        if sum(int(r["amount"]) for r in history[acct]) != bal:
            raise RuntimeError(f"{acct}: history does not sum to the balance")
        entry_keys = [r["key"] for r in history[acct]]
        if len(entry_keys) != len(set(entry_keys)):
            raise RuntimeError(f"{acct}: an idempotency key was applied twice")
    calls_logged: dict[str, list[dict[str, str]]] = {}
    for acct in accounts:
        raw = await retry("calls", partial(client.xrange, f"{ledger.account_key(acct)}:calls"))
        calls_logged[acct] = [f for _, f in entries(raw)]
    for res in results:
        if res.status != "ALLOWED" or res.error:
            continue
        keys = {r["key"] for r in history[res.account]}
        if f"auth:{res.uid}" not in keys:
            lost_reserves += 1
        logged = [c for c in calls_logged[res.account] if c.get("ref") == res.uid]
        if len(logged) != 1:
            not_logged += 1
            continue
        blocks = int(logged[0]["blocks"])
        if any(f"blk:{res.uid}:{n}" not in keys for n in range(1, blocks + 1)):
            lost_blocks += 1
        charged = -sum(int(r["amount"]) for r in history[res.account]
                       if res.uid in r.get("ref", "") and r["kind"] != "reserve")
        assert res.billsec is not None
        if charged != int(logged[0]["cost"]) or charged not in (
                cost(rate, res.billsec), cost(rate, res.billsec + 1)):
            wrong_charge += 1
            continue
        completed.append(res)
    applied = {r["key"] for r in history["probe"] if r["kind"] == "credit"}
    probe_lost = probe.acknowledged - applied

    auth = [r.auth_ms for r in results if r.auth_ms is not None and r.status == "ALLOWED"]
    calm = [r.auth_ms for r in results if r.auth_ms is not None and r.status == "ALLOWED"
            and r.auth_span is not None and (r.auth_span[1] < probe.killed_wall
                                             or r.auth_span[0] > probe.healthy_wall)]
    held = 0
    for acct in accounts:
        held += (await retry("account", partial(ledger.get, acct))).held
    server_ms: list[float] = []
    for server in rig.servers:
        for m in AGI_LOG.finditer(server.log.read_text(errors="replace")):
            if m.group(2) == "ALLOWED":
                server_ms.append(float(m.group(3)))
    refused = [r for r in results if r.status and r.status != "ALLOWED"]
    settled = sorted(r.settled_at for r in completed if r.settled_at is not None)
    steady = ((len(settled) - 1) / (settled[-1] - settled[0])
              if len(settled) > 1 and settled[-1] > settled[0] else 0.0)
    span = (max(settled) - started) if settled else 0.0
    return {
        "servers": len(rig.servers),
        "cluster": "3 primaries + 3 replicas, node timeout 1 s",
        "calls_offered": len(results),
        "offered_rate_per_s": RATE_PER_SERVER * len(rig.servers),
        "offer_seconds": round(offer_seconds, 2),
        "max_concurrent_per_server": MAX_CONCURRENT,
        "max_up_per_server": max(s.max_in_flight for s in rig.servers),
        "call_seconds": CALL_SECONDS,
        "accounts": ACCOUNTS,
        "accounts_on_killed_primary": on_victim,
        "calls_allowed": sum(1 for r in results if r.status == "ALLOWED"),
        "calls_refused": len(refused),
        "refused_reasons": sorted({f"{r.status}/{r.reason}" for r in refused}),
        "calls_with_errors": sum(1 for r in results if r.error),
        "errors": sorted({r.error for r in results if r.error})[:3],
        "calls_completed_verified": len(completed),
        "completed_calls_per_s": round(len(completed) / span, 2) if span else 0.0,
        "settling_rate_per_s": round(steady, 2),
        "run_seconds": round(span, 2),
        "auth_p50_ms": round(percentile(auth, 50), 1),
        "auth_p99_ms": round(percentile(auth, 99), 1),
        "auth_outside_failover_p50_ms": round(percentile(calm, 50), 1),
        "auth_outside_failover_p99_ms": round(percentile(calm, 99), 1),
        "auth_server_p50_ms": round(percentile(server_ms, 50), 1),
        "auth_server_p99_ms": round(percentile(server_ms, 99), 1),
        "failover_client_pause_s": round(probe.pause(), 2),
        "failover_healthy_after_s": round(heal_wait, 2),
        "probe_writes_acknowledged": len(probe.acknowledged),
        "probe_writes_lost": len(probe_lost),
        "call_reserves_lost": lost_reserves,
        "call_blocks_lost": lost_blocks,
        "calls_not_logged": not_logged,
        "calls_charged_wrong": wrong_charge,
        "holds_left": held,
    }


def run() -> dict[str, Any]:
    reason = pbx_unavailable_reason()
    if reason is not None:
        return {"skipped": reason}
    with tempfile.TemporaryDirectory(prefix="prepaid-bench-scale-") as tmp:
        rig = Rig(Path(tmp))
        try:
            try:
                rig.start()
            except ClusterUnsupported as exc:
                return {"skipped": f"redis-server has no cluster support: {exc}"}
            return asyncio.run(_run(rig))
        finally:
            rig.stop()


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
