"""The "My account" page to look at, without Asterisk and without root (see docs/demo.md).

    python -m testbed.webdemo                      # the page at a loopback URL until Ctrl-C
    python -m testbed.webdemo --screenshots DIR    # or: headless Chromium's screenshots

A private Redis, an SMTP sink (mails to ``<dir>/mail``), the page as ``prepaid serve``
runs it (sandbox gateway), the mail worker, and a demo account with a PIN, a card, an
automatic top-up and some history and calls. ``make demo`` (testbed/demo.py) shows the same
page after its calls on the real Asterisk, with the accounts the calls used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from policy.mailer import MailWorker
from prepaid import keys
from prepaid.config import Settings, parse
from prepaid.pins import set_pin
from prepaid.store import Store, open_store
from testbed.servers import RedisServer
from testbed.smtp_sink import SmtpSink
from testbed.web import WebPage, browser_missing, chromium, screenshot, with_web

EUR = 1_000_000
ACCOUNT, PIN = "demo", "1234"
BASE = Path(os.environ.get("PREPAID_DEMO_DIR", "/tmp/asterisk-prepaid-demo")) / "web"


async def seed(st: Store, account: str = ACCOUNT, pin: str = PIN) -> None:
    """A demo account: 25.00 with some history, a sandbox card, top up 20 below 5, calls."""
    ledger = st.ledger
    await ledger.create_account(account, currency="EUR", email=f"{account}@demo.example")
    await ledger.credit(account, 20 * EUR, key="demo:opening", ref="opening (support)")
    await ledger.update(account, card_token="tok_ok", card_brand="visa", card_last4="4242",
                        card_exp="12/30", threshold=str(5 * EUR), action="topup",
                        topup_amount=str(20 * EUR), policy_enabled="1")
    calls = keys.account_calls(st.settings.redis.key_prefix, account)
    now = time.time()
    for n, (number, seconds, cost) in enumerate([("+353871234567", 184, 620_000),
                                                 ("+442071234567", 45, 180_000),
                                                 ("+390612345678", 612, 2_450_000)]):
        ref = f"demo-call-{n}"
        await ledger.debit(account, cost, key=f"demo:{ref}", ref=f"call {ref}")
        started = now - 3600 * (3 - n)
        await st.redis.xadd(calls, {"ref": ref, "number": number.lstrip("+"), "prefix": "",
                                    "rate": "", "answered": f"{started:.3f}",
                                    "ended": f"{started + seconds:.3f}",
                                    "duration": str(seconds), "billed": str(seconds),
                                    "cost": str(cost), "cause": "16", "source": "cdr",
                                    "cutoff": "0"})
    await ledger.credit(account, 10 * EUR, key="demo:preset", ref="cs_sandbox_demo_preset")
    await set_pin(ledger, account, pin)


def screenshots(url: str, out: Path, account: str = ACCOUNT, pin: str = PIN) -> list[Path]:
    """Log in with headless Chromium and keep a whole-page screenshot of each page."""
    out.mkdir(parents=True, exist_ok=True)
    driver = chromium()
    shots: list[Path] = []
    wait = WebDriverWait(driver, 15, poll_frequency=0.05)
    try:
        driver.get(f"{url}/login")
        shots.append(screenshot(driver, out / "login.png"))
        driver.find_element(By.ID, "account").send_keys(account)
        driver.find_element(By.ID, "pin").send_keys(pin)
        driver.find_element(By.ID, "login").click()
        wait.until(lambda d: d.find_elements(By.ID, "balance"), "the account page")
        shots.append(screenshot(driver, out / "account.png"))
        driver.find_element(By.ID, "add-10.00").click()
        wait.until(lambda d: "/sandbox/checkout/" in d.current_url, "the payment page")
        shots.append(screenshot(driver, out / "sandbox-payment.png"))
    finally:
        driver.quit()
    return shots


def _mail_forever(settings: Settings, stop: threading.Event) -> None:
    async def go() -> None:
        st = await open_store(settings)
        worker = MailWorker(st.redis, settings.smtp, prefix=settings.redis.key_prefix)
        await worker.ensure_group()
        while not stop.is_set():
            await worker.process_batch(200)
        await st.close()
    asyncio.run(go())


def run(out: Path | None) -> int:
    shutil.rmtree(BASE, ignore_errors=True)
    redis = RedisServer()
    redis.start()
    sink = SmtpSink(BASE / "mail").start()
    settings = with_web(parse({"redis": {"url": redis.url},
                               "smtp": {"host": "127.0.0.1", "port": sink.port,
                                        "from": "prepaid@demo.example"}}, env={}))
    settings = replace(settings, web=replace(settings.web, support_email="support@demo.example"))

    async def prepare() -> None:
        st = await open_store(settings)
        await seed(st)
        await st.close()
    stop = threading.Event()
    mailer = threading.Thread(target=_mail_forever, args=(settings, stop), daemon=True)
    try:
        asyncio.run(prepare())
        mailer.start()
        with WebPage(settings) as page:
            if out is not None:
                for path in screenshots(page.url, out):
                    print(f"screenshot: {path}")
                return 0
            print(f"\nMy account: {page.url}/login\n  account {ACCOUNT!r}, PIN {PIN}\n"
                  f"  sandbox test card 4242 4242 4242 4242, any future expiry\n"
                  f"  mails land in {BASE / 'mail'}\nCtrl-C stops it.", flush=True)
            _wait_for_ctrl_c()
            return 0
    finally:
        stop.set()
        if mailer.is_alive():
            mailer.join(5)
        sink.stop()
        redis.cleanup()


def _wait_for_ctrl_c() -> None:
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    with contextlib.suppress(KeyboardInterrupt):
        done.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.webdemo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--screenshots", type=Path, metavar="DIR",
                        help="take screenshots of the pages into DIR and exit")
    args = parser.parse_args(argv)
    if args.screenshots is not None and browser_missing():
        print(f"webdemo: {browser_missing()}")
        return 2
    return run(args.screenshots)


if __name__ == "__main__":
    raise SystemExit(main())
