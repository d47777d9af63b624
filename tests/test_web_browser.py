"""The web page in a real headless Chromium (Debian's, through Selenium and Debian's
chromedriver): log in, store a card on the sandbox's hosted page, set "top up
automatically at 5, add 20", add 10 from the presets; then the balance in Redis, the
e-mails in the SMTP sink and the history agree. A screenshot of each page goes into the
test's output directory."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from policy.gateway import SandboxGateway
from prepaid.config import Settings
from prepaid.store import open_store
from testbed.web import WebPage, browser_missing, chromium, screenshot
from tests.conftest import assert_verified
from tests.test_policy_support import EUR, Smtp, body, mailer, smtp, worker
from tests.web_fixtures import PIN, account, settings

__all__ = ["settings", "smtp"]  # fixtures

pytestmark = pytest.mark.skipif(bool(browser_missing()), reason=browser_missing())


@pytest.fixture
def browser() -> Iterator[Any]:
    driver = chromium()
    try:
        yield driver
    finally:
        driver.quit()


class Pages:
    """Steps of a customer in the browser, each page's screenshot kept."""

    def __init__(self, driver: Any, url: str, out: Path) -> None:
        self.driver, self.url, self.out = driver, url, out
        self.shots: list[Path] = []

    def shot(self, name: str) -> None:
        path = self.out / f"{len(self.shots) + 1:02d}-{name}.png"
        self.shots.append(screenshot(self.driver, path))

    def wait_for(self, what: str, check: Any, seconds: float = 15) -> None:
        WebDriverWait(self.driver, seconds, poll_frequency=0.05).until(
            lambda d: check(d), message=what)

    def submit(self, element_id: str, then_path: str) -> None:
        """Click, then wait for the next page (its path starts with ``then_path``)."""
        self.driver.find_element(By.ID, element_id).click()
        self.wait_for(f"a page at {then_path}",
                      lambda d: d.current_url.removeprefix(self.url).startswith(then_path)
                      and d.execute_script("return document.readyState") == "complete")

    def type(self, element_id: str, value: str) -> None:
        field = self.driver.find_element(By.ID, element_id)
        field.clear()
        field.send_keys(value)

    def text(self, element_id: str) -> str:
        return str(self.driver.find_element(By.ID, element_id).text)


async def _seed(settings: Settings) -> None:
    st = await open_store(settings)
    await account(st, balance=12 * EUR)
    await st.close()


async def _after(settings: Settings, smtp: Smtp) -> dict[str, Any]:
    """A call takes the balance below 5: the policy worker tops up 20 from the stored card;
    the mail worker sends what is queued. What Redis says afterwards."""
    st = await open_store(settings)
    try:
        await st.ledger.debit("1001", 18 * EUR, key="call:browser-1", ref="call browser-1")
        await worker(st, gateway=SandboxGateway(st.redis, st.ledger.prefix)).process_batch()
        m = mailer(st)
        await m.ensure_group()
        for _ in range(50):  # polling with a bound: until both mails are out
            await m.process_batch(100)
            if len(smtp.messages) >= 2:
                break
            await asyncio.sleep(0.05)
        acct = await st.ledger.get("1001")
        return {"acct": acct, "history": await st.ledger.history("1001", 50)}
    finally:
        await st.close()


def test_a_customer_logs_in_stores_a_card_sets_automatic_top_up_and_adds_credit(
        settings: Settings, smtp: Smtp, browser: Any, tmp_path: Path) -> None:
    asyncio.run(_seed(settings))
    with WebPage(settings) as page:
        p = Pages(browser, page.url, tmp_path)
        browser.get(page.url + "/login")
        p.shot("login")
        p.type("account", "1001")
        p.type("pin", PIN)
        p.submit("login", "/account")
        assert p.text("balance") == "EUR 12.00"
        p.shot("account")

        # Store a card on the sandbox's hosted page.
        p.submit("add-card", "/sandbox/checkout/")
        p.shot("sandbox-setup")
        p.type("number", "4242 4242 4242 4242")
        p.type("exp", "12/39")
        p.submit("submit", "/account")
        assert "Your card is stored" in browser.page_source
        assert p.text("card-label") == "Visa ending 4242, expires 12/39"

        # "Top up automatically at 5, add 20".
        browser.find_element(By.ID, "action-topup").click()
        p.type("threshold", "5")
        p.type("topup-amount", "20")
        p.submit("save-policy", "/account")
        assert "Your low-balance setting is saved." in browser.page_source
        assert p.text("policy-summary") == ("When the balance falls below EUR 5.00, we add "
                                            "EUR 20.00 from your card.")
        assert browser.find_element(By.ID, "action-topup").is_selected()
        p.shot("policy-saved")

        # Add 10 from the presets.
        p.submit("add-10.00", "/sandbox/checkout/")
        assert "Pay EUR 10.00" in browser.page_source
        p.shot("sandbox-payment")
        p.type("number", "4242424242424242")
        p.type("exp", "12/39")
        p.submit("submit", "/account")
        assert "your payment is received and credited" in browser.page_source
        assert p.text("balance") == "EUR 22.00"
        p.shot("credited")

        state = asyncio.run(_after(settings, smtp))
        browser.get(page.url + "/account")
        assert p.text("balance") == "EUR 24.00"
        p.shot("after-automatic-top-up")
        rows = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#history tbody tr")]

    acct, history = state["acct"], state["history"]
    # Redis: 12 + 10 (the preset) - 18 (the call) + 20 (the automatic top-up).
    assert acct.balance == 24 * EUR
    assert (acct.action, acct.threshold, acct.topup_amount, acct.card_last4) == (
        "topup", 5 * EUR, 20 * EUR, "4242")
    amounts = [(e.kind, e.amount) for e in reversed(history)]
    assert amounts == [("open", 0), ("credit", 12 * EUR), ("credit", 10 * EUR),
                       ("debit", -18 * EUR), ("credit", 20 * EUR)]
    checkout_ref = history[2].ref
    assert checkout_ref.startswith("cs_sandbox_")
    # The page's history: the same entries, newest first.
    assert len(rows) == 5 and "account opened" in rows[4]
    assert rows[0].split()[2:5] == ["credit", "EUR", "20.00"]
    assert "EUR 10.00 EUR 22.00" in rows[2] and checkout_ref in rows[2]
    # The SMTP sink: the preset's receipt and the automatic top-up's, both to the customer.
    subjects = sorted(str(m["Subject"]) for m in smtp.messages)
    assert len(subjects) == 2 and "Top-up of EUR 10.00 received" in subjects
    [preset] = [m for m in smtp.messages if m["Subject"] == "Top-up of EUR 10.00 received"]
    assert checkout_ref in body(preset) and "New balance: EUR 22.00" in body(preset)
    [auto] = [m for m in smtp.messages if m is not preset]
    assert "20.00" in body(auto) and "4242" in body(auto)
    assert {str(m["To"]) for m in smtp.messages} == {"ann@example.org"}
    assert [s.name for s in p.shots] == [
        "01-login.png", "02-account.png", "03-sandbox-setup.png", "04-policy-saved.png",
        "05-sandbox-payment.png", "06-credited.png", "07-after-automatic-top-up.png"]
    assert all(s.stat().st_size > 10_000 for s in p.shots)
    asyncio.run(assert_verified(settings.redis.url))  # the walk-through left no mismatch
