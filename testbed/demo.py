"""``make demo``: the whole system on a real Asterisk, live in the terminal (see docs/demo.md).

Sets up a private Redis, an SMTP sink writing mails to ``<dir>/mail/``, the Asterisk 22 test
bed (testbed/pbx.py) running the project's dialplan, a config and rate deck, and a few accounts
(made with the ``prepaid`` CLI); runs ``prepaid serve`` as a subprocess; places a script of
calls through AMI Originate; shows calls, balances, prompts, e-mails and top-ups as they
happen; prints a summary; and stops everything again, also on Ctrl-C.

Needs root (Asterisk runs chrooted). ``PREPAID_DEMO_DIR`` moves the work folder
(default /tmp/asterisk-prepaid-demo); it is emptied at the start of each run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from email.message import Message as EmailMessage
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from prepaid.callrecord import record_key
from prepaid.config import load
from prepaid.ledger import Ledger
from prepaid.money import format_amount
from prepaid.ratedeck import Normalisation, parse_csv
from prepaid.rating import cost
from prepaid.redis_client import RedisClient, connect
from testbed.ami import Ami, Message
from testbed.pbx import (
    Pbx,
    free_port,
    pbx_unavailable_reason,
    project_ami_user,
)
from testbed.servers import RedisServer
from testbed.smtp_sink import SmtpSink
from testbed.web import browser_missing
from testbed.webdemo import screenshots

BASE = Path(os.environ.get("PREPAID_DEMO_DIR", "/tmp/asterisk-prepaid-demo"))
VENV_BIN = Path(sys.executable).parent
PREPAID = str(VENV_BIN / "prepaid")
DEADLINE = 90.0  # seconds for the scripted calls, after which the demo gives up
WEB_ACCOUNT, WEB_PIN = "alice", "1234"  # who logs in to "My account" after the calls

RATES = """\
prefix,name,price_per_minute,connect_fee,initial_increment,increment
88,Demo trunk (hangs up after NN s),60.00,0,1,1
39,Italy (stays up),60.00,0,1,1
44,United Kingdom,6.00,0.10,6,6
"""

DECK = parse_csv(RATES, "rates.csv")
NORM = Normalisation(("+", "00"), "", "")

# (account, opening balance, e-mail, extra CLI commands, what it shows)
ACCOUNTS: list[tuple[str, str, str, list[list[str]], str]] = [
    ("alice", "10.00", "alice@demo.example", [], "funded: an ordinary call, per second"),
    ("bob", "0", "", [], "empty: refused, hears balance-too-low"),
    ("carol", "7.00", "carol@demo.example",
     [["policy", "carol", "--threshold", "5", "--action", "email"]],
     "e-mail when the balance falls below 5.00"),
    ("dave", "3.00", "dave@demo.example",
     [["card", "set", "dave", "--token", "tok_ok", "--brand", "visa", "--last4", "4242",
       "--exp", "12/30"],
      ["policy", "dave", "--threshold", "2", "--action", "topup", "--amount", "10"]],
     "auto top-up of 10.00 from a sandbox card below 2.00"),
    ("erin", "4.00", "", [], "4 s of credit, calls a number that never hangs up"),
    ("frank", "6.00", "", [], "two calls at once share 6.00"),
]


@dataclass
class DemoCall:
    at: float  # seconds after the start of the script
    account: str
    number: str
    what: str
    ref: str = field(default_factory=lambda: f"demo{secrets.token_hex(5)}")
    state: str = "waiting"
    channel: str = ""
    answered: float | None = None
    ended: float | None = None
    billsec: str = ""
    charged: int | None = None
    settled: bool = False
    metered: bool = False  # authorized by the AGI: metering settles it
    prompts: list[str] = field(default_factory=list)

    @property
    def cdr_cost(self) -> int | None:
        """What Asterisk's own billable seconds cost at the deck's rate."""
        if not self.billsec.isdigit() or not self.metered:
            return None
        return cost(DECK.lookup(self.number, NORM), int(self.billsec))

    @property
    def talk(self) -> str:
        if self.answered is None:
            return ""
        end = self.ended if self.ended is not None else time.time()
        return f"{end - self.answered:.1f}"


def script() -> list[DemoCall]:
    return [
        DemoCall(0.0, "alice", "00880512345", "answered, far end hangs up after 5 s"),
        DemoCall(0.3, "bob", "00390612345678", "no credit"),
        DemoCall(0.6, "carol", "00880412345", "4 s call crosses the 5.00 threshold"),
        DemoCall(0.9, "dave", "00880812345", "8 s call, credit for 3 s, top-up below 2.00"),
        DemoCall(1.2, "erin", "00390612345678", "stays up until the credit runs out"),
        DemoCall(1.5, "frank", "00390611111111", "shares 6.00 with the next call"),
        DemoCall(1.6, "frank", "00390622222222", "shares 6.00 with the previous call"),
        DemoCall(7.0, "alice", "*100", "balance check: 'your balance is ...'"),
    ]


class Demo:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.redis: RedisServer | None = None
        self.smtp: SmtpSink | None = None
        self.pbx: Pbx | None = None
        self.serve: subprocess.Popen[bytes] | None = None
        self.ami: Ami | None = None
        self.client: RedisClient | None = None
        self.ledger: Ledger | None = None
        self.config = BASE / "prepaid.toml"
        self.env = dict(os.environ)
        self.calls = script()
        self.events: list[str] = []
        self.opening: dict[str, int] = {}
        self.balances: dict[str, tuple[int, int]] = {}
        self.topups: dict[str, int] = {}
        self.started = 0.0
        self.log_offset = 0
        self.seen_mail: list[EmailMessage] = []
        self.web_port = 0

    # -- set-up -----------------------------------------------------------------------
    def note(self, text: str) -> None:
        stamp = f"{time.monotonic() - self.started:5.1f}s" if self.started else "  -  "
        self.events.append(f"[dim]{stamp}[/] {text}")

    def cli(self, *args: str, stdin: str | None = None) -> str:
        cmd = [PREPAID, "--config", str(self.config), *args]
        self.console.print(f"  [dim]$ prepaid {' '.join(args)}[/]")
        res = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=30,
                             input=stdin)
        if res.returncode != 0:
            raise RuntimeError(f"prepaid {' '.join(args)} failed: {res.stderr.strip()}")
        return res.stdout

    async def set_up(self) -> None:
        c = self.console
        shutil.rmtree(BASE, ignore_errors=True)
        (BASE / "mail").mkdir(parents=True)
        c.print(f"[bold]Setting up[/] in {BASE}")
        self.redis = RedisServer()
        self.redis.start()
        c.print(f"  Redis on 127.0.0.1:{self.redis.port}")
        self.smtp = SmtpSink(BASE / "mail").start()
        c.print(f"  SMTP sink on 127.0.0.1:{self.smtp.port}, mails to {BASE / 'mail'}")
        agi_port = free_port(socket.SOCK_STREAM)
        self.web_port = free_port(socket.SOCK_STREAM)
        self.pbx = Pbx(agi_port=agi_port)
        await asyncio.to_thread(self.pbx.start)
        c.print(f"  Asterisk 22 (project dialplan, AMI 127.0.0.1:{self.pbx.ami_port}) booted in "
                f"{self.pbx.boot_seconds:.1f} s; log {self.pbx.log_path}")
        user, secret = project_ami_user()
        (BASE / "rates.csv").write_text(RATES)
        self.config.write_text(
            "# Written by testbed/demo.py\n"
            f'[redis]\nurl = "{self.redis.url}"\n\n'
            '[billing]\ncurrency = "EUR"\nrates = "rates.csv"\nnational_prefix = ""\n'
            'max_call_seconds = 600\n\n'
            f'[ami]\nhost = "127.0.0.1"\nport = {self.pbx.ami_port}\nusername = "{user}"\n'
            'reconnect_max_seconds = 2.0\n\n'
            f'[agi]\nlisten = "127.0.0.1:{agi_port}"\n\n'
            f'[smtp]\nhost = "127.0.0.1"\nport = {self.smtp.port}\n'
            'from = "prepaid@demo.example"\n\n'
            '[payments]\ngateway = "sandbox"\n\n'
            f'[web]\nlisten = "127.0.0.1:{self.web_port}"\n'
            'support_email = "support@demo.example"\n')
        self.config.chmod(0o640)
        self.env["PREPAID_AMI_SECRET"] = secret  # secrets in the environment, not the file
        load(self.config, self.env)  # a bad config fails here, with the key named
        c.print(f"  config {self.config} (AMI user {user!r}, secret from PREPAID_AMI_SECRET)")
        self.cli("rates", "import")
        for name, amount, email, extra, _ in ACCOUNTS:
            self.cli("account", "create", name, *(["--email", email] if email else []))
            if amount != "0":
                self.cli("topup", name, amount, "--reference", f"demo-opening-{name}")
            for args in extra:
                self.cli(*args)
        self.cli("account", "pin", WEB_ACCOUNT, stdin=f"{WEB_PIN}\n")  # for "My account"
        self.client = connect(self.redis.url)
        self.ledger = Ledger(self.client)
        for name, *_ in ACCOUNTS:
            acct = await self.ledger.get(name)
            self.opening[name] = acct.balance
            self.balances[name] = (acct.balance, acct.held)

    def spawn_serve(self, log_path: Path) -> subprocess.Popen[bytes]:
        with log_path.open("wb") as out:
            return subprocess.Popen(
                [PREPAID, "--config", str(self.config), "serve"], stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                start_new_session=True)

    async def start_serve(self) -> None:
        log_path = BASE / "serve.log"
        self.console.print(f"  [dim]$ prepaid --config {self.config} serve[/]  (log {log_path})")
        self.serve = self.spawn_serve(log_path)
        wanted = ["FastAGI listening", "AMI connected", "policy worker", "web page on"]
        deadline = time.monotonic() + 20
        while True:
            text = log_path.read_text(errors="replace")
            if all(w in text for w in wanted):
                break
            if self.serve.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prepaid serve did not come up:\n{text[-3000:]}")
            await asyncio.sleep(0.05)  # polling a log file with a deadline
        self.console.print("  prepaid serve is up: FastAGI, AMI metering, policy worker, "
                           f"web page on http://127.0.0.1:{self.web_port}")
        assert self.pbx is not None
        self.ami = await Ami.connect(self.pbx.ami_port, self.pbx.ami_username,
                                     self.pbx.ami_secret)
        self.log_offset = len(self.pbx.log_text())

    # -- the show ---------------------------------------------------------------------
    async def place(self, call: DemoCall) -> None:
        assert self.ami is not None
        resp = await self.ami.action(
            "Originate", Channel=f"Local/{call.number}@prepaid-outbound", Application="Wait",
            Data="300", CallerID=f'"{call.account}" <{call.account}>', Account=call.account,
            Async="true",
            Timeout="30000", ChannelId=f"orig-{call.ref}", OtherChannelId=call.ref)
        call.state = "calling" if resp.get("Response") == "Success" else "originate failed"
        self.note(f"{call.account} dials {call.number} ({call.what})")

    def on_event(self, msg: Message) -> None:
        uid = msg.get("Uniqueid", "") or msg.get("UniqueID", "")
        call = next((c for c in self.calls if c.ref == uid), None)
        if call is None:
            return
        ev = msg.get("Event")
        if ev == "Newchannel":
            call.channel = msg.get("Channel", "")
        elif ev == "VarSet" and msg.get("Variable") == "PREPAID_STATUS":
            call.state = msg.get("Value", "").lower() or "?"
            call.metered = msg.get("Value") == "ALLOWED"
        elif ev == "VarSet" and msg.get("Variable") == "PREPAID_REASON" and msg.get("Value"):
            call.state = f"{call.state} {msg['Value']}"
            self.note(f"{call.account}: refused, {msg['Value']}")
        elif (ev == "VarSet" and msg.get("Variable") == "PREPAID_MAX_SECONDS"
              and msg.get("Value", "0") != "0"):
            self.note(f"{call.account}: allowed, credit for {msg['Value']} s")
        elif ev == "DialEnd" and msg.get("DialStatus") == "ANSWER":
            call.state, call.answered = "talking", float(msg.get("Timestamp", time.time()))
        elif ev == "Hangup":
            call.ended = float(msg.get("Timestamp", time.time()))
            if call.state in ("talking", "calling"):
                call.state = "ended"
            cause = msg.get("Cause-txt", "")
            talked = f" after {call.talk} s" if call.answered is not None else ""
            self.note(f"{call.account}: hung up{talked} ({cause})")
        elif ev == "Cdr" and msg.get("LastApplication") == "Dial":
            call.billsec = msg.get("BillableSeconds", "")

    async def watch_ami(self) -> None:
        assert self.ami is not None
        while True:
            self.on_event(await self.ami.events.get())

    async def refresh(self) -> None:
        """Balances, settlements, top-ups, prompts played and mails, from the real stores."""
        assert self.ledger is not None and self.pbx is not None and self.smtp is not None
        for name, *_ in ACCOUNTS:
            acct = await self.ledger.get(name)
            self.balances[name] = (acct.balance, acct.held)
            history = await self.ledger.history(name, 200)
            for e in history:
                key = f"{name}:{e.id}"
                # Credits that start "call ..." give back a block a call never reached;
                # they are part of what the call was charged, not top-ups.
                if (e.kind == "credit" and "demo-opening" not in e.ref
                        and not e.ref.startswith("call ") and key not in self.topups):
                    self.topups[key] = e.amount
                    self.note(f"[green]{name}: topped up {format_amount(e.amount, 'EUR')}[/]"
                              f" ({e.ref})")
            for call in self.calls:
                if call.account == name and call.ended is not None and not call.settled:
                    assert self.client is not None
                    raw = await self.client.hget(record_key("prepaid", call.ref), "state")
                    state = raw.decode() if isinstance(raw, bytes) else raw or ""
                    if state in ("ended", "released") or not call.metered:
                        call.settled = True
                        call.charged = -sum(x.amount for x in history
                                            if call.ref in x.ref and x.kind != "reserve")
                        if call.charged:
                            self.note(f"{name}: call charged "
                                      f"{format_amount(call.charged, 'EUR')}")
        text = self.pbx.log_text()
        for m in re.finditer(r"<([^>]+)> Playing '(prepaid/[^.']+)", text[self.log_offset:]):
            channel, prompt = m.group(1), m.group(2)
            hearer = next((c for c in self.calls if c.channel and channel.startswith(
                c.channel.split(";")[0])), None)
            who = hearer.account if hearer else channel
            if hearer is not None:
                hearer.prompts.append(prompt)
            self.note(f"[cyan]{who} hears {prompt}[/]")
        self.log_offset = len(text)
        while len(self.seen_mail) < self.smtp.count():
            msg = self.smtp.messages[len(self.seen_mail)]
            self.seen_mail.append(msg)
            self.note(f"[magenta]mail to {msg['To']}: {msg['Subject']}[/]")

    def view(self) -> Group:
        calls = Table("account", "dials", "state", "talk s", "CDR billsec", "charged",
                      "what it shows", title="calls", expand=True)
        for c in self.calls:
            calls.add_row(c.account, c.number, c.state, c.talk, c.billsec,
                          "" if c.charged is None else format_amount(c.charged, "EUR"), c.what)
        accounts = Table("account", "opening", "balance", "held", "top-ups", "set-up",
                         title="balances (live from the ledger)", expand=True)
        for name, _, _, _, what in ACCOUNTS:
            balance, held = self.balances.get(name, (0, 0))
            ups = sum(v for k, v in self.topups.items() if k.startswith(f"{name}:"))
            accounts.add_row(name, format_amount(self.opening.get(name, 0), "EUR"),
                             format_amount(balance, "EUR"), format_amount(held, "EUR"),
                             format_amount(ups, "EUR") if ups else "", what)
        log = "\n".join(self.events[-14:])
        return Group(calls, accounts, Panel(log, title="what happens", height=16))

    def done(self) -> bool:
        if not all(c.settled for c in self.calls):
            return False
        mails_expected = 2  # carol's warning, dave's top-up receipt
        return self.smtp is not None and self.smtp.count() >= mails_expected

    async def run_script(self) -> None:
        self.started = time.monotonic()
        reader = asyncio.create_task(self.watch_ami(), name="demo-ami")
        pending = sorted(self.calls, key=lambda c: c.at)
        try:
            with Live(self.view(), console=self.console, refresh_per_second=8) as live:
                while time.monotonic() - self.started < DEADLINE:
                    now = time.monotonic() - self.started
                    while pending and pending[0].at <= now:
                        await self.place(pending.pop(0))
                    await self.refresh()
                    live.update(self.view())
                    if not pending and self.done():
                        break
                    await asyncio.sleep(0.1)  # the display's frame rate
                else:
                    self.note("[red]gave up waiting: not every call settled[/]")
                live.update(self.view())
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    def summary(self) -> None:
        calls = Table("account", "dials", "outcome", "talk s", "CDR billsec", "CDR x rate",
                      "charged", "prompts heard", title="calls")
        for c in self.calls:
            shown = "" if c.charged is None else format_amount(c.charged, "EUR")
            ref = c.cdr_cost
            if ref is not None and c.charged is not None and ref != c.charged:
                shown = f"[red]{shown} (!)[/]"
            calls.add_row(c.account, c.number, c.state, c.talk, c.billsec,
                          "" if ref is None else format_amount(ref, "EUR"), shown,
                          ", ".join(dict.fromkeys(p.removeprefix("prepaid/") for p in c.prompts)))
        self.console.print(calls)
        if any(c.cdr_cost is not None and c.charged is not None and c.cdr_cost != c.charged
               for c in self.calls):
            self.console.print("[red](!)[/] charged differs from the rate deck's cost of "
                               "Asterisk's billable seconds (see docs/demo.md)")
        t = Table("account", "opening", "closing", "calls", "charged", "top-ups", "mails",
                  title="summary", show_lines=False)
        for name, *_ in ACCOUNTS:
            mine = [c for c in self.calls if c.account == name]
            charged = sum(c.charged or 0 for c in mine)
            ups = sum(v for k, v in self.topups.items() if k.startswith(f"{name}:"))
            mails = sum(1 for m in self.seen_mail if name in str(m["To"]))
            t.add_row(name, format_amount(self.opening[name], "EUR"),
                      format_amount(self.balances[name][0], "EUR"), str(len(mine)),
                      format_amount(charged, "EUR"), format_amount(ups, "EUR") if ups else "",
                      str(mails))
        self.console.print(t)
        self.console.print(f"Script ran {time.monotonic() - self.started:.1f} s. Mails: "
                           f"{BASE / 'mail'}; services' log: {BASE / 'serve.log'}; Asterisk's "
                           f"log: {self.pbx.log_path if self.pbx else '-'}")

    # -- the web page -----------------------------------------------------------------
    async def show_web(self) -> None:
        """Leave "My account" up until Ctrl-C; without a terminal (or with
        PREPAID_DEMO_WEB=screenshots) print screenshots of it instead."""
        c, url = self.console, f"http://127.0.0.1:{self.web_port}"
        if sys.stdin.isatty() and os.environ.get("PREPAID_DEMO_WEB") != "screenshots":
            c.print(f"\n[bold]My account[/] is at [bold]{url}/login[/]: account "
                    f"{WEB_ACCOUNT!r}, PIN {WEB_PIN} (sandbox test card 4242 4242 4242 4242). "
                    "Ctrl-C stops the demo.")
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()  # Ctrl-C here is the normal end of the demo
            return
        if browser_missing():
            c.print(f"[yellow]No screenshots of My account: {browser_missing()}[/]")
            return
        for path in await asyncio.to_thread(screenshots, url, BASE / "screenshots",
                                            WEB_ACCOUNT, WEB_PIN):
            c.print(f"  screenshot of My account: {path}")

    # -- tear-down --------------------------------------------------------------------
    async def tear_down(self) -> None:
        if self.ami is not None:
            with contextlib.suppress(Exception):
                await self.ami.close()
        if self.serve is not None and self.serve.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.serve.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(self.serve.wait, 15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.serve.pid, signal.SIGKILL)
                self.serve.wait(5)
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()
        if self.pbx is not None:
            await asyncio.to_thread(self.pbx.stop)
        if self.smtp is not None:
            self.smtp.stop()
        if self.redis is not None:
            self.redis.cleanup()


async def amain(console: Console) -> int:
    if os.geteuid() != 0:
        console.print("[red]The demo needs root: Asterisk runs chrooted in a Debian root.[/]")
        return 2
    console.print("Checking the Asterisk 22 root folder (built once, about a minute) ...")
    reason = await asyncio.to_thread(pbx_unavailable_reason)
    if reason is not None:
        console.print(f"[red]Cannot run Asterisk here: {reason}[/]")
        return 2
    demo = Demo(console)
    started = time.monotonic()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C or kill: stop everything, then exit
        loop.add_signal_handler(sig, main_task.cancel)
    try:
        await demo.set_up()
        await demo.start_serve()
        console.print("[bold]Placing the scripted calls[/] (AMI Originate of "
                      "Local/<number>@prepaid-outbound, caller id = account)")
        await demo.run_script()
        demo.summary()
        ok = all(c.settled for c in demo.calls)
        await demo.show_web()
    finally:
        console.print("Stopping prepaid serve, Asterisk, the SMTP sink and Redis ...")
        await demo.tear_down()
    console.print(f"Demo done in {time.monotonic() - started:.1f} s.")
    return 0 if ok else 1


def main() -> int:
    console = Console()
    try:
        return asyncio.run(amain(console))
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("[yellow]Interrupted; everything was stopped.[/]")
        return 130
    except (RuntimeError, OSError) as exc:
        console.print(f"[red]demo failed: {exc}[/]")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
