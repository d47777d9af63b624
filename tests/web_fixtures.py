"""Shared pieces of the web page's tests: the page on a real uvicorn, a real Redis and an
SMTP sink, accounts with PINs, and an HTTP client that logs in like a browser."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from prepaid.config import Settings, parse
from prepaid.pins import set_pin
from prepaid.store import Store, open_store
from testbed.web import WebPage, with_web
from tests.test_policy_support import EUR, Smtp

PIN = "4321"


def web_settings(redis_url: str, smtp_port: int, **web: Any) -> Settings:
    settings = parse({"redis": {"url": redis_url},
                      "smtp": {"host": "127.0.0.1", "port": smtp_port, "from": "billing@pbx.test",
                               "timeout": 2.0},
                      "policy": {"max_topup": "100", "presets": ["5", "10", "20", "50"]}},
                     env={})
    return with_web(settings, **web)


@pytest.fixture
def settings(redis_url: str, smtp: Smtp) -> Settings:
    return web_settings(redis_url, smtp.port)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    st = await open_store(settings)
    yield st
    await st.close()


@pytest.fixture
def page(settings: Settings) -> Iterator[WebPage]:
    with WebPage(settings) as running:
        yield running


async def account(st: Store, account_id: str = "1001", *, balance: int = 12 * EUR,
                  pin: str | None = PIN, email: str = "ann@example.org") -> None:
    await st.ledger.create_account(account_id, currency="EUR", email=email)
    if balance:
        await st.ledger.credit(account_id, balance, key=f"seed:{account_id}", ref="opening")
    if pin is not None:
        await set_pin(st.ledger, account_id, pin)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)


class Browser:
    """An HTTP client that keeps the session cookie and posts each form's CSRF token."""

    def __init__(self, url: str, **kw: Any) -> None:
        self.http = httpx.AsyncClient(base_url=url, follow_redirects=False, **kw)
        self.csrf = ""

    async def get(self, path: str) -> httpx.Response:
        resp = await self.http.get(path)
        if 'name="csrf"' in resp.text:
            self.csrf = csrf_of(resp.text)
        return resp

    async def post(self, path: str, data: dict[str, str], *, csrf: bool = True) -> httpx.Response:
        body = {**data, "csrf": self.csrf} if csrf else data
        resp = await self.http.post(path, data=body)
        if 'name="csrf"' in resp.text:
            self.csrf = csrf_of(resp.text)
        return resp

    async def login(self, account_id: str = "1001", pin: str = PIN) -> httpx.Response:
        await self.get("/login")
        resp = await self.post("/login", {"account": account_id, "pin": pin})
        if resp.status_code == 303:
            await self.get("/account")
        return resp

    async def aclose(self) -> None:
        await self.http.aclose()
