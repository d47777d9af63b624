"""Shared pieces of the policy tests: settings, store, a real SMTP sink, a crashing gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from email.message import Message
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from policy.gateway import ChargeResult, SandboxGateway
from policy.mailer import MailWorker
from policy.worker import PolicyWorker
from prepaid.config import Settings, parse
from prepaid.store import Store, open_store
from testbed.servers import Mailbox, free_port

EUR = 1_000_000


class Smtp:
    """aiosmtpd on a fixed free port that a test can start late or stop."""

    def __init__(self, handler: Any = None) -> None:
        self.port = free_port()
        self.mailbox = handler or Mailbox()
        self.controller: Controller | None = None

    def start(self) -> None:
        self.controller = Controller(self.mailbox, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    @property
    def messages(self) -> list[Message]:
        messages: list[Message] = self.mailbox.messages
        return messages


@pytest.fixture
def smtp() -> Iterator[Smtp]:
    server = Smtp()
    server.start()
    yield server
    server.stop()


def make_settings(redis_url: str, smtp_port: int, **policy: Any) -> Settings:
    return parse({"redis": {"url": redis_url},
                  "smtp": {"host": "127.0.0.1", "port": smtp_port, "from": "billing@pbx.test",
                           "timeout": 2.0},
                  "policy": {"daily_topups": 5, "daily_topup_amount": "500",
                             "max_topup": "100", "max_declines": 3,
                             "decline_backoff_seconds": 600, **policy}}, env={})


@pytest.fixture
async def store(redis_url: str, smtp: Smtp) -> AsyncIterator[Store]:
    st = await open_store(make_settings(redis_url, smtp.port))
    yield st
    await st.close()


async def new_account(st: Store, account: str = "1001", *, balance: int = 10 * EUR,
                      threshold: int = 5 * EUR, action: str = "topup", amount: int = 20 * EUR,
                      token: str = "tok_ok", email: str = "ann@example.org") -> None:
    await st.ledger.create_account(account, currency="EUR", email=email)
    if balance:
        await st.ledger.credit(account, balance, key=f"seed:{account}", ref="seed")
    fields = {"threshold": str(threshold), "action": action, "topup_amount": str(amount),
              "policy_enabled": "1"}
    if token:
        fields.update(card_token=token, card_brand="visa", card_last4="4242", card_exp="12/30")
    await st.ledger.update(account, **fields)


def worker(st: Store, name: str = "w1", *, gateway: Any = None, now: Callable[[], float] | None
           = None, **kw: Any) -> PolicyWorker:
    return PolicyWorker(st.redis, st.ledger, st.settings,
                        gateway or SandboxGateway(st.redis, st.ledger.prefix), consumer=name,
                        now=now or time.time, **kw)


def mailer(st: Store, name: str = "m1", **kw: Any) -> MailWorker:
    return MailWorker(st.redis, st.settings.smtp, prefix=st.ledger.prefix, consumer=name, **kw)


class Crash(BaseException):
    """Stands for the worker process dying: nothing in the worker catches it."""


class CrashAfterCharge:
    """The real sandbox charge, then the 'process' dies before anything else happens."""

    def __init__(self, inner: SandboxGateway) -> None:
        self.inner = inner

    async def charge(self, account: str, token: str, amount_micros: int, currency: str,
                     idempotency_key: str) -> ChargeResult:
        await self.inner.charge(account, token, amount_micros, currency, idempotency_key)
        raise Crash()


class GatedGateway:
    """Holds every charge until the test opens the gate, to line up a race on purpose."""

    def __init__(self, inner: SandboxGateway) -> None:
        self.inner = inner
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def charge(self, account: str, token: str, amount_micros: int, currency: str,
                     idempotency_key: str) -> ChargeResult:
        self.entered.set()
        await asyncio.wait_for(self.gate.wait(), 5)
        return await self.inner.charge(account, token, amount_micros, currency, idempotency_key)


async def wait_until(check: Callable[[], Awaitable[bool]], limit: float = 5.0) -> None:
    """Poll a condition with a deadline (not sleeping for luck)."""
    deadline = time.monotonic() + limit
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def body(msg: Message, subtype: str = "plain") -> str:
    for part in msg.walk():
        if part.get_content_type() == f"text/{subtype}":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload.decode(part.get_content_charset() or "utf-8").replace("\r\n", "\n")
    raise AssertionError(f"no text/{subtype} part")
