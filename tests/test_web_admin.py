"""The admin's view of the web page: a separate role with its own password and lock-out,
that sees accounts, live calls and support requests; neither role can use the other's
pages."""

from __future__ import annotations

import asyncio
from pathlib import Path

from click.testing import CliRunner

from prepaid.pins import MAX_FAILURES
from prepaid.store import Store
from shell.cli import main
from testbed.web import WebPage
from tests.test_policy_support import EUR, smtp
from tests.web_fixtures import Browser, account, page, settings, store

__all__ = ["page", "settings", "smtp", "store"]  # fixtures
PASSWORD = "correct horse battery"


async def admin_password(store: Store, tmp_path: Path, password: str) -> tuple[int, str]:
    conf = tmp_path / "prepaid.toml"
    conf.write_text(f'[redis]\nurl = "{store.settings.redis.url}"\n')
    res = await asyncio.to_thread(CliRunner().invoke, main,
                                  ["--config", str(conf), "web-admin", "password"],
                                  input=password + "\n")
    return res.exit_code, res.output


async def admin_login(b: Browser, password: str = PASSWORD) -> int:
    await b.get("/admin/login")
    return (await b.post("/admin/login", {"password": password})).status_code


async def test_the_admin_sees_accounts_live_calls_and_requests(store: Store, page: WebPage,
                                                              tmp_path: Path) -> None:
    code, out = await admin_password(store, tmp_path, "short")
    assert code == 1 and "at least 12 printable characters" in out
    code, out = await admin_password(store, tmp_path, PASSWORD)
    assert (code, out.strip()) == (0, "web admin password set")
    stored = await store.redis.get(f"{store.settings.redis.key_prefix}:web-admin")
    assert stored is not None and PASSWORD.encode() not in stored
    await account(store, "1001", balance=12 * EUR)
    await account(store, "1002", balance=30 * EUR, pin="8765")
    await store.ledger.reserve("1002", "call:pbx-a-1700000000.1", 2 * EUR, key="r1", ref="x")
    customer = Browser(page.url)
    await customer.login("1001")
    await customer.post("/support", {"amount": "250.00", "note": "trade fair"})
    assert (await customer.get("/admin")).headers["location"] == "/admin/login"
    admin = Browser(page.url)
    assert (await admin.get("/admin")).headers["location"] == "/admin/login"
    assert await admin_login(admin) == 303
    shown = (await admin.get("/admin")).text
    assert "1001" in shown and "EUR 12.00" in shown and "EUR 30.00" in shown
    assert "pbx-a-1700000000.1" in shown and "EUR 2.00" in shown and "pbx-a" in shown
    assert "trade fair" in shown and "prepaid topup 1001 250.00 --override" in shown
    # The admin is nobody's customer.
    assert (await admin.get("/account")).headers["location"] == "/login"
    await admin.aclose()
    await customer.aclose()


async def test_the_admin_log_in_is_locked_after_wrong_passwords(store: Store, page: WebPage,
                                                               tmp_path: Path) -> None:
    await admin_password(store, tmp_path, PASSWORD)
    b = Browser(page.url)
    await b.get("/admin/login")
    assert (await b.post("/admin/login", {"password": PASSWORD}, csrf=False)
            ).status_code == 403
    for n in range(MAX_FAILURES):
        assert await admin_login(b, f"wrong password {n}") == 401
    assert await admin_login(b) == 429  # the right one, too late
    assert (await b.get("/admin")).headers["location"] == "/admin/login"
    await b.aclose()
