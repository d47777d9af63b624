"""Billing checked against Asterisk's own CDR, over real SIP.

Asterisk 22 runs the shipped asterisk-conf/ files (only ports and secrets changed) with
``Pbx(trunk="sip")``: callers are PJSIP endpoints whose accountcode names the paying account,
the shipped ``Dial(PJSIP/<number>@my-trunk)`` goes to a far-end SIPp that answers and echoes
the RTP (testbed/sipload.py). The real ``prepaid serve`` runs as its own process (its whole
process group is what a restart kills), with a config made from asterisk-conf/prepaid.toml.

Every charge is checked against cdr_csv's Master.csv, Asterisk's record written apart from
anything the product reads: each answered call's charges in the ledger equal the rate deck's
cost of its CDR billsec; balances plus charges equal top-ups; no hold is left.

Nothing sleeps for luck: waits are bounded polls of the ledger, the CDR file or SIPp's log.
The one timed step is the restart scenario's own timeline (kill 4 s into the call, start
again 3 s later).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from prepaid.callrecord import record_key
from prepaid.config import Settings, parse
from prepaid.ledger import Entry
from prepaid.ratedeck import parse_csv
from prepaid.rating import Rate, cost, cost_of_billed, covered_seconds
from prepaid.store import Store, open_store
from testbed.pbx import PROJECT_CONF, Cdr, Pbx, free_port, project_ami_user
from testbed.servers import toml_text
from testbed.sipload import CallSpec, FarEnd, LoadResult, UacRun, agi_latencies, start_calls
from tests.conftest import assert_verified

pytestmark = pytest.mark.pbx
log = logging.getLogger(__name__)

T = TypeVar("T")
EUR = 1_000_000
PREPAID = str(Path(sys.executable).parent / "prepaid")

# Numbers are dialed as 00<prefix>...: the shipped [billing] strips "00" and matches the
# longest prefix. Three billing schemes, priced so that charges are easy to read.
RATES_CSV = """\
prefix,name,price_per_minute,connect_fee,initial_increment,increment
4420,SIP 1/1,60.00,0,1,1
4430,SIP 30/6,6.00,0.05,30,6
4460,SIP 60/60,1.20,0,60,60
"""
DECK = parse_csv(RATES_CSV, "sip-rates.csv")
NUMBER = {"1/1": "0044201234567", "30/6": "0044301234567", "60/60": "0044601234567"}
CALL_REF = re.compile(r"^call (\S+)")


async def until(check: Callable[[], Awaitable[T | None]], what: str, within: float) -> T:
    """Poll ``check`` every 100 ms until it returns something other than None/False."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.1)


def shipped_config(redis_url: str, pbx: Pbx, agi_port: int,
                   **overrides: dict[str, Any]) -> dict[str, Any]:
    """asterisk-conf/prepaid.toml as shipped, with only what this host changes: where Redis,
    AMI, the FastAGI port, SMTP and the CDR file are. ``overrides`` maps a section to keys
    to change in it (e.g. ``ami={"grace_seconds": 5}``)."""
    data: dict[str, Any] = tomllib.loads((PROJECT_CONF / "prepaid.toml").read_text())
    data["redis"]["url"] = redis_url
    data["ami"].update(host="127.0.0.1", port=pbx.ami_port, cdr_file=str(pbx.cdr_custom_path))
    data["agi"]["listen"] = f"127.0.0.1:{agi_port}"
    data["smtp"].update(host="127.0.0.1", port=free_port())  # nothing listens: no mail here
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return data


def spawn_serve(config: Path, log_path: Path, secret: str) -> subprocess.Popen[bytes]:
    """`prepaid serve` (all its services) in a session of its own, so that a kill of its
    process group takes every process it started; its output appended to ``log_path``."""
    with log_path.open("ab") as out:
        out.write(f"\n---- prepaid serve started {time.strftime('%T')} ----\n".encode())
        out.flush()
        return subprocess.Popen(
            [PREPAID, "--config", str(config), "serve"], stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "PREPAID_AMI_SECRET": secret})


@dataclass
class Bed:
    """Asterisk (trunk="sip"), the far end, Redis and one `prepaid serve` process at a time."""

    pbx: Pbx
    far: FarEnd
    settings: Settings
    store: Store
    config: Path
    work: Path
    secret: str
    serves: list[subprocess.Popen[bytes]] = field(default_factory=list)
    runs: list[UacRun] = field(default_factory=list)
    topups: dict[str, int] = field(default_factory=dict)

    # -- prepaid serve -----------------------------------------------------------------
    @property
    def serve_log(self) -> Path:
        return self.work / "serve.log"

    async def start_serve(self) -> subprocess.Popen[bytes]:
        """`prepaid serve` in its own session; back once the metering user is logged in to
        Asterisk, the FastAGI port answers, and (when the product beats) metering says up."""
        mark = len(self.pbx.log_text())
        log_mark = self.serve_log.stat().st_size if self.serve_log.exists() else 0
        proc = spawn_serve(self.config, self.serve_log, self.secret)
        self.serves.append(proc)
        user = self.settings.ami.username
        try:
            await asyncio.to_thread(self.pbx.wait_for_log, f"Manager '{user}' logged on",
                                    30, mark)
        except TimeoutError:
            raise AssertionError("prepaid serve did not log in to AMI\n"
                                 + self.serve_tail()) from None

        async def agi_up() -> bool:
            # Its own log line, rather than a probe connection the server would log as a
            # dropped AGI session.
            if proc.poll() is not None:
                raise AssertionError(f"prepaid serve exited {proc.returncode}\n"
                                     + self.serve_tail())
            listening = f"FastAGI listening on {self.settings.agi.listen}"
            return listening in self.serve_log.read_text(errors="replace")[log_mark:]

        await until(agi_up, "the FastAGI server listening", 20)
        await self.metering_up()
        return proc

    async def metering_up(self) -> None:
        """The listener's heartbeat says "up" (a product without one has no such key: then
        logging in to AMI is all there is to wait for)."""
        key = f"{self.settings.redis.key_prefix}:meter:{self.settings.ami.system_name or '-'}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            state = await self.store.redis.hget(key, "state")
            if state == b"up":
                return
            if state is None and time.monotonic() > deadline - 7:
                return  # no heartbeat after 3 s: this product version has none
            await asyncio.sleep(0.1)
        raise AssertionError(f"metering not up after 10 s ({key})\n" + self.serve_tail())

    def kill_serve(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the whole process group of a `prepaid serve`, as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def decisions(self) -> dict[str, int]:
        """How many authorizations `prepaid serve` logged per outcome ("ALLOWED", "ERROR
        NO_METERING", ...): for assertion messages only, the checks use Asterisk's side."""
        text = self.serve_log.read_text(errors="replace") if self.serve_log.exists() else ""
        found = re.findall(r"agi\.routes: call \S+ account .*?: (\w+ ?\w*) max ", text)
        counts: dict[str, int] = defaultdict(int)
        for d in found:
            counts[d.strip()] += 1
        return dict(counts)

    def prompts(self, mark: int = 0) -> dict[str, int]:
        """How many times each prepaid prompt was played (Asterisk's log after ``mark``)."""
        counts: dict[str, int] = defaultdict(int)
        for name in re.findall(r"Playing 'prepaid/([\w-]+)\.", self.pbx.log_text()[mark:]):
            counts[name] += 1
        return dict(counts)

    def serve_tail(self, chars: int = 4000) -> str:
        try:
            return f"--- {self.serve_log} ---\n" + self.serve_log.read_text(
                errors="replace")[-chars:]
        except OSError:
            return ""

    # -- accounts and calls ------------------------------------------------------------
    async def account(self, name: str, balance: int) -> None:
        await self.store.ledger.create_account(name, currency="EUR")
        if balance:
            await self.store.ledger.credit(name, balance, key=f"seed:{name}", ref="sip seed")
        self.topups[name] = balance

    def calls(self, specs: list[CallSpec], rate: float, **kw: Any) -> UacRun:
        run = start_calls(self.pbx, specs, rate=rate, **kw)
        self.runs.append(run)
        return run

    async def finish(self, run: UacRun) -> LoadResult:
        return await asyncio.to_thread(run.wait)

    # -- what happened -----------------------------------------------------------------
    def dialed_cdrs(self) -> dict[str, Cdr]:
        """Master.csv's CDRs of calls that were dialed to the trunk (the allowed calls), by
        the caller channel's uniqueid (the product's call reference)."""
        return {u: c for u, c in self.pbx.cdrs().items()
                if c.lastapp == "Dial" and c.dstchannel.startswith("PJSIP/my-trunk-")}

    async def ledger_view(self) -> Ledger:
        view = Ledger()
        for account in self.topups:
            acct = await self.store.ledger.get(account)
            history = await self.store.ledger.history(account, 1_000_000)
            view.add(account, acct.balance, acct.held, history)
        return view

    async def settled(self, refs: Iterable[str], within: float = 30) -> Ledger:
        """Wait (bounded) until every call in ``refs`` is settled: its live-call record ended
        or released, no hold left on any account; returns the ledger as it is then."""
        refs = list(refs)
        prefix = self.settings.redis.key_prefix

        async def check() -> Ledger | None:
            for ref in refs:
                state = await self.store.redis.hget(record_key(prefix, ref), "state")
                if state not in (b"ended", b"released"):
                    return None
            view = await self.ledger_view()
            return view if view.held == 0 else None

        try:
            return await until(check, f"{len(refs)} calls settled, no hold left", within)
        except AssertionError as exc:
            view = await self.ledger_view()
            states = {}
            for ref in refs:
                raw = await self.store.redis.hget(record_key(prefix, ref), "state")
                states[ref] = raw.decode() if isinstance(raw, bytes) else raw
            open_ = {r: s for r, s in states.items() if s not in ("ended", "released")}
            raise AssertionError(f"{exc}: held {view.held_by}, not settled "
                                 f"{dict(list(open_.items())[:10])} of {len(open_)}\n"
                                 + self.serve_tail()) from None


@dataclass
class Ledger:
    """Each account's balance, holds and history, and the charges of each call in it."""

    balance: dict[str, int] = field(default_factory=dict)
    held_by: dict[str, int] = field(default_factory=dict)
    credits: dict[str, int] = field(default_factory=dict)
    charges: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    account_of: dict[str, str] = field(default_factory=dict)
    unattributed: list[tuple[str, Entry]] = field(default_factory=list)
    history_sum: dict[str, int] = field(default_factory=dict)

    def add(self, account: str, balance: int, held: int, history: list[Entry]) -> None:
        self.balance[account], self.held_by[account] = balance, held
        self.history_sum[account] = sum(e.amount for e in history)
        self.credits[account] = 0
        for e in history:
            if not e.amount:
                continue  # reserve, release, open: no money moved
            m = CALL_REF.match(e.ref)
            if m:
                self.charges[m.group(1)] -= e.amount
                self.account_of[m.group(1)] = account
            elif e.kind == "credit":
                self.credits[account] += e.amount
            else:
                self.unattributed.append((account, e))

    @property
    def held(self) -> int:
        return sum(self.held_by.values())


def rate_for(number: str, settings: Settings) -> Rate:
    return DECK.lookup(number, settings.billing.normalisation)


def paid_seconds(rate: Rate, charged: int) -> int:
    """The seconds ``charged`` micro-units pay for, block by block (the meter's paid time)."""
    n = 0
    while cost_of_billed(rate, covered_seconds(rate, n + 1)) <= charged:
        n += 1
    return covered_seconds(rate, n)


def check_bills(view: Ledger, cdrs: dict[str, Cdr], settings: Settings,
                topups: dict[str, int]) -> None:
    """Every dialed call is charged the deck's cost of its CDR billsec, nothing else is
    charged, balances plus charges equal top-ups, no hold is left."""
    wrong = []
    for ref, cdr in sorted(cdrs.items()):
        want = cost(rate_for(cdr.dst, settings), cdr.billsec)
        got = view.charges.get(ref, 0)
        if got != want:
            wrong.append(f"{ref} {cdr.accountcode} -> {cdr.dst}: billsec {cdr.billsec} "
                         f"(answer {cdr.answer}, end {cdr.end}) costs {want}, charged {got}")
    phantom = {r: c for r, c in view.charges.items() if c and r not in cdrs}
    by_account: dict[str, int] = defaultdict(int)
    for ref, amount in view.charges.items():
        by_account[view.account_of[ref]] += amount
    books = {a: (view.balance[a], by_account[a], topups[a]) for a in topups
             if view.balance[a] + by_account[a] != topups[a]
             or view.history_sum[a] != view.balance[a]}
    misbilled = f"{len(wrong)} of {len(cdrs)} calls misbilled against Master.csv"
    assert not wrong, misbilled + ":\n" + "\n".join(wrong[:30])
    assert not phantom, f"charges for calls with no CDR: {phantom}"
    assert not view.unattributed, f"balance changes of no call: {view.unattributed[:10]}"
    assert not books, f"balance + charges != top-ups (balance, charges, top-ups): {books}"
    assert view.held == 0, f"holds left: {view.held_by}"


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture
async def make_bed(pbx_root: Path, redis_url: str, tmp_path: Path
                   ) -> AsyncIterator[Callable[..., Awaitable[Bed]]]:
    """``await make_bed(accounts, ami={"grace_seconds": 5})``: Asterisk with one endpoint per
    account, the far end, the rate deck in Redis; `prepaid serve` started by the test."""
    beds: list[Bed] = []
    pbxs: list[Pbx] = []

    async def make(accounts: list[str], **overrides: dict[str, Any]) -> Bed:
        agi_port = free_port(socket.SOCK_STREAM)
        pbx = Pbx(pbx_root, agi_port=agi_port, trunk="sip", sip_accounts=accounts)
        pbxs.append(pbx)
        pbx.start()
        far = FarEnd(pbx).start()
        user, secret = project_ami_user()
        data = shipped_config(redis_url, pbx, agi_port, **overrides)
        assert data["ami"]["username"] == user
        settings = parse(data, "<sip-billing>", env={"PREPAID_AMI_SECRET": secret})
        config = tmp_path / "prepaid.toml"
        config.write_text(toml_text(data))
        config.chmod(0o600)
        store = await open_store(settings)
        await store.rates.replace(DECK)
        bed = Bed(pbx, far, settings, store, config, tmp_path, secret)
        beds.append(bed)
        return bed

    yield make
    for bed in beds:
        for run in bed.runs:
            run.kill()
        for proc in bed.serves:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.to_thread(proc.wait, 15)
                except subprocess.TimeoutExpired:
                    bed.kill_serve(proc)
        bed.far.close()
        await bed.store.close()
    for pbx in pbxs:
        pbx.stop()


# ------------------------------------------------------------------------------- scenarios


async def test_hundreds_of_calls_each_billed_its_cdr_billsec(
        make_bed: Callable[..., Awaitable[Bed]]) -> None:
    """200 calls at 10/s, 2-5 s each, over 40 accounts and the three decks."""
    accounts = [f"30{i:02d}" for i in range(40)]
    bed = await make_bed(accounts)
    await bed.start_serve()
    for a in accounts:
        await bed.account(a, 50 * EUR)
    decks = list(NUMBER.values())
    specs = [CallSpec(accounts[i % len(accounts)], decks[i % 3], 2000 + 1000 * (i % 4))
             for i in range(200)]
    mark = len(bed.pbx.log_text())
    run = bed.calls(specs, rate=10)
    res = await bed.finish(run)
    latencies = sorted(agi_latencies(bed.pbx, mark).values())
    if latencies:
        log.info("authorization as Asterisk saw it: p50 %.0f ms, max %.0f ms over %d calls",
                 1000 * latencies[len(latencies) // 2], 1000 * latencies[-1], len(latencies))
    assert res.by_end() == {"caller": 200}, (
        f"not every caller hung up itself: {res.by_end()}; prompts played "
        f"{bed.prompts(mark)}; authorizations {bed.decisions()}; the far end saw "
        f"{len(bed.far.invites())} INVITEs")
    assert len(bed.far.invites()) == 200

    async def all_cdrs() -> dict[str, Cdr] | None:
        cdrs = bed.dialed_cdrs()
        return cdrs if len(cdrs) == 200 else None

    cdrs = await until(all_cdrs, "200 dialed calls in Master.csv", 15)
    assert {c.accountcode for c in cdrs.values()} == set(accounts)
    assert all(c.answered and 2 <= c.billsec <= 5 for c in cdrs.values()), sorted(
        (c.billsec, c.disposition) for c in cdrs.values())
    view = await bed.settled(cdrs)
    check_bills(view, cdrs, bed.settings, bed.topups)
    await assert_verified(bed.store.ledger)


async def test_simultaneous_calls_are_cut_off_without_overdraft(
        make_bed: Callable[..., Awaitable[Bed]]) -> None:
    """20 calls at once on 30 s of credit (1/1 at 1.00/s): the calls the credit admits are
    dialed, the others hear balance-too-low; Asterisk ends every call (the callers never hang
    up); the balance does not go below zero; each dialed call pays its CDR billsec."""
    bed = await make_bed(["4001"])
    await bed.start_serve()
    await bed.account("4001", 30 * EUR)
    mark = len(bed.pbx.log_text())
    specs = [CallSpec("4001", NUMBER["1/1"], 0) for _ in range(20)]
    run = bed.calls(specs, rate=20, wait_ms=45_000)
    res = await bed.finish(run)
    assert res.by_end() == {"remote": 20}, (res.by_end(), run.output())

    async def every_call_accounted() -> bool:
        # Master.csv and the log are written as the calls end: poll them, bounded.
        return len(bed.dialed_cdrs()) + len(refused_for_credit(bed.pbx, mark, "4001")) >= 20

    with contextlib.suppress(AssertionError):
        await until(every_call_accounted, "a CDR or a refusal for each call", 10)
    cdrs = bed.dialed_cdrs()
    refused = refused_for_credit(bed.pbx, mark, "4001")
    assert cdrs, f"no call dialed on 30 s of credit ({len(refused)} refused)"
    assert len(cdrs) + len(refused) == 20, (
        f"{len(cdrs)} dialed, {len(refused)} heard balance-too-low; prompts "
        f"{bed.prompts(mark)}, authorizations {bed.decisions()}")
    assert len(bed.far.invites()) == len(cdrs)
    view = await bed.settled(cdrs)
    assert view.balance["4001"] >= 0, (
        f"overdraft: balance {view.balance['4001']}, billsecs "
        f"{sorted(c.billsec for c in cdrs.values())}")
    assert sum(c.billsec for c in cdrs.values()) <= 30
    check_bills(view, cdrs, bed.settings, bed.topups)
    await assert_verified(bed.store.ledger)


def refused_for_credit(pbx: Pbx, mark: int, account: str) -> set[str]:
    """Caller channels of ``account`` that heard balance-too-low (Asterisk's log)."""
    return set(re.findall(
        rf"<(PJSIP/{re.escape(account)}-[0-9a-f]+)> Playing 'prepaid/balance-too-low\.",
        pbx.log_text()[mark:]))


async def test_empty_account_is_refused_and_never_dialed(
        make_bed: Callable[..., Awaitable[Bed]]) -> None:
    bed = await make_bed(["5001"])
    await bed.start_serve()
    await bed.account("5001", 0)
    mark = len(bed.pbx.log_text())
    specs = [CallSpec("5001", NUMBER["1/1"], 0) for _ in range(10)]
    run = bed.calls(specs, rate=5, wait_ms=30_000)
    res = await bed.finish(run)
    assert res.by_end() == {"remote": 10}, (res.by_end(), run.output())  # Asterisk hung up
    assert bed.far.invites() == []

    async def prompts_played() -> set[str] | None:
        # Asterisk's logger thread writes a moment after the call: poll, bounded.
        played = refused_for_credit(bed.pbx, mark, "5001")
        return played if len(played) == 10 else None

    try:
        await until(prompts_played, "balance-too-low played to each of the 10 callers", 5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: prompts played {bed.prompts(mark)}, authorizations "
                             f"{bed.decisions()}") from None
    assert bed.dialed_cdrs() == {}
    acct = await bed.store.ledger.get("5001")
    assert (acct.balance, acct.held) == (0, 0)
    assert [e.kind for e in await bed.store.ledger.history("5001", 100)] == ["open"]
    await assert_verified(bed.store.ledger)


@pytest.mark.parametrize("deck", ["1/1", "30/6", "60/60"])
async def test_restart_within_grace_drops_no_call(
        make_bed: Callable[..., Awaitable[Bed]], deck: str) -> None:
    """`prepaid serve` SIGKILLed 4 s into a 12 s answered call and started again 3 s later:
    the caller hangs up at 12 s (Asterisk did not drop the call), and it pays its billsec."""
    bed = await make_bed(["6001"])
    first = await bed.start_serve()
    await bed.account("6001", 100 * EUR)
    run = bed.calls([CallSpec("6001", NUMBER[deck], 12_000, tag="restart")], rate=1)
    answered = await answered_at(run)
    await asyncio.sleep(max(0.0, answered + 4 - time.monotonic()))  # the scenario's timeline
    bed.kill_serve(first)
    killed = time.monotonic()
    await asyncio.sleep(max(0.0, killed + 3 - time.monotonic()))
    await bed.start_serve()
    res = await bed.finish(run)
    cdrs = bed.dialed_cdrs()
    assert len(cdrs) == 1, (cdrs, run.output())
    (cdr,) = cdrs.values()
    assert [o.end for o in res.outcomes] == ["caller"], (
        f"Asterisk ended the call after {cdr.billsec} s, not the caller at 12 s")
    assert 11 <= cdr.billsec <= 12, cdr
    view = await bed.settled(cdrs)
    check_bills(view, cdrs, bed.settings, bed.topups)
    await assert_verified(bed.store.ledger)


@pytest.mark.parametrize(("deck", "hold_ms"), [("1/1", 40_000), ("30/6", 60_000)])
async def test_kill_longer_than_grace_ends_the_call_at_paid_time_plus_grace(
        make_bed: Callable[..., Awaitable[Bed]], deck: str, hold_ms: int) -> None:
    """Killed 4 s into the call and away until past its paid time plus [ami] grace_seconds:
    Asterisk itself ends the call at about the paid time plus the grace (the caller would have
    stayed on), and the call pays its CDR billsec once the service is back."""
    grace = 5
    bed = await make_bed(["6101"], ami={"grace_seconds": grace})
    first = await bed.start_serve()
    await bed.account("6101", 100 * EUR)
    rate = rate_for(NUMBER[deck], bed.settings)
    run = bed.calls([CallSpec("6101", NUMBER[deck], hold_ms, tag="away")], rate=1)
    answered = await answered_at(run)
    await asyncio.sleep(max(0.0, answered + 4 - time.monotonic()))  # the scenario's timeline
    bed.kill_serve(first)
    killed = time.monotonic()
    paid = paid_seconds(rate, sum((await bed.ledger_view()).charges.values()))
    # Away for longer than the grace, and until after the call's paid time plus the grace.
    back = max(killed + grace + 6, answered + paid + grace + 4)
    await asyncio.sleep(max(0.0, back - time.monotonic()))
    await bed.start_serve()
    res = await bed.finish(run)
    cdrs = bed.dialed_cdrs()
    assert len(cdrs) == 1, (cdrs, run.output())
    (cdr,) = cdrs.values()
    assert [o.end for o in res.outcomes] == ["remote"], (
        f"the call was not ended by Asterisk (billsec {cdr.billsec}, paid {paid} s at the "
        f"kill, grace {grace} s)")
    assert paid + grace - 2 <= cdr.billsec <= paid + grace + 2, (
        f"billsec {cdr.billsec}, paid {paid} s at the kill, grace {grace} s")
    view = await bed.settled(cdrs)
    check_bills(view, cdrs, bed.settings, bed.topups)
    await assert_verified(bed.store.ledger)


async def answered_at(run: UacRun, within: float = 15) -> float:
    """The monotonic time the caller saw its (only) call answered (SIPp's log, polled)."""
    async def check() -> float | None:
        if not run.running() and not run.answered_tags():
            raise AssertionError("SIPp ended before the call was answered\n" + run.output())
        return time.monotonic() if run.answered_tags() else None

    return await until(check, "the call answered", within)
