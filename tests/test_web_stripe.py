"""Stripe Checkout and its webhook on the web page: the official SDK against a local server
standing in for the Stripe API, and webhooks signed with Stripe's scheme (HMAC-SHA256 of
``<timestamp>.<payload>``, header ``t=...,v1=...``) that the SDK verifies. Replayed,
reordered and forged deliveries: a bad signature is refused, nothing is credited twice."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from policy.web import fulfil
from policy.web.checkout import StripeCheckout
from prepaid.config import Settings
from prepaid.store import Store
from testbed.servers import free_port
from testbed.web import WebPage
from tests.test_policy_support import EUR, Smtp, smtp
from tests.web_fixtures import Browser, account, page, store, web_settings

# fixtures; store and page take this module's Stripe settings
__all__ = ["page", "smtp", "store"]
SECRET = "whsec_test_secret"


@dataclass
class FakeStripeApi:
    """Answers the Stripe API calls of the page from ``replies``: (method, path) -> JSON."""

    port: int
    replies: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    seen: list[tuple[str, str, dict[str, list[str]]]] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def stripe_api() -> Iterator[FakeStripeApi]:
    state = FakeStripeApi(free_port())

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method: str) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length).decode() if length else url.query
            state.seen.append((method, url.path, parse_qs(raw, keep_blank_values=True)))
            reply = state.replies.get((method, url.path))
            status = 200 if reply is not None else 404
            data = json.dumps(reply if reply is not None else {"error": {
                "type": "invalid_request_error", "message": f"no {url.path}"}}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._answer("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._answer("POST")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", state.port), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def settings(redis_url: str, smtp: Smtp, stripe_api: FakeStripeApi) -> Settings:
    base = web_settings(redis_url, smtp.port)
    return replace(base, payments=replace(base.payments, gateway="stripe",
                                          stripe_api_key="sk_test_123",
                                          stripe_api_base=stripe_api.base,
                                          stripe_webhook_secret=SECRET))



def session(sid: str, account_id: str = "1001", amount: int = 1000, paid: bool = True,
            mode: str = "payment") -> dict[str, Any]:
    obj: dict[str, Any] = {"id": sid, "object": "checkout.session", "mode": mode,
                           "status": "complete", "metadata": {"prepaid_account": account_id},
                           "client_reference_id": account_id, "customer": "cus_1"}
    if mode == "payment":
        obj.update(amount_total=amount, currency="eur",
                   payment_status="paid" if paid else "unpaid")
    else:
        obj.update(setup_intent="seti_1", payment_status="no_payment_required")
    return obj


def event(eid: str, obj: dict[str, Any], kind: str = "checkout.session.completed") -> bytes:
    return json.dumps({"id": eid, "object": "event", "type": kind, "api_version": "2024-06-20",
                       "created": int(time.time()), "data": {"object": obj}}).encode()


def signed(payload: bytes, secret: str = SECRET, at: int | None = None) -> str:
    """Stripe's signature header for ``payload`` (its documented scheme)."""
    stamp = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{stamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={mac}"


async def deliver(url: str, payload: bytes, signature: str | None = None) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(f"{url}/webhook/stripe", content=payload, headers={
            "Stripe-Signature": signed(payload) if signature is None else signature,
            "Content-Type": "application/json"})


async def credits(st: Store) -> list[str]:
    return [e.ref for e in await st.ledger.history("1001", 100) if e.kind == "credit"
            and e.ref.startswith("cs_")]


async def test_a_replayed_webhook_credits_once(store: Store, page: WebPage) -> None:
    await account(store)
    payload = event("evt_1", session("cs_test_1"))
    answers = [await deliver(page.url, payload) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.json()["outcome"] for a in answers] == ["credited", "duplicate", "duplicate"]
    assert (await store.ledger.get("1001")).balance == 22 * EUR
    assert await credits(store) == ["cs_test_1"]
    mail_ids = [k async for k in store.redis.scan_iter("prepaid:{mail}:checkout:*")]
    assert len(mail_ids) == 1  # one receipt


async def test_reordered_webhooks_credit_each_session_once(store: Store, page: WebPage) -> None:
    await account(store)
    one, two = event("evt_1", session("cs_a", amount=500)), event("evt_2", session("cs_b"))
    unpaid_first = event("evt_3", session("cs_c", amount=2000, paid=False))
    paid_later = event("evt_4", session("cs_c", amount=2000),
                       "checkout.session.async_payment_succeeded")
    for payload in (two, paid_later, one, unpaid_first, two, one, paid_later):
        assert (await deliver(page.url, payload)).status_code == 200
    assert sorted(await credits(store)) == ["cs_a", "cs_b", "cs_c"]
    assert (await store.ledger.get("1001")).balance == (12 + 5 + 10 + 20) * EUR


async def test_forged_webhooks_are_refused_and_credit_nothing(store: Store,
                                                              page: WebPage) -> None:
    await account(store)
    payload = event("evt_1", session("cs_test_1"))
    tampered = payload.replace(b'"amount_total": 1000', b'"amount_total": 100000')
    assert tampered != payload
    forged = [
        signed(payload, "whsec_someone_else"),                 # another secret
        signed(payload).replace("v1=", "v1=0"),                 # a broken signature
        signed(payload, at=int(time.time()) - 3600),            # an old one, replayed
        "",                                                     # none
    ]
    for header in forged:
        resp = await deliver(page.url, payload, header)
        assert resp.status_code == 400 and resp.json() == {"error": "bad signature"}
    resp = await deliver(page.url, tampered, signed(payload))  # signed before tampering
    assert resp.status_code == 400
    assert (await store.ledger.get("1001")).balance == 12 * EUR
    assert await credits(store) == []
    # A session of an account the page did not start (no metadata): ignored.
    stranger = session("cs_x")
    stranger["metadata"] = {}
    assert (await deliver(page.url, event("evt_9", stranger))).json()["outcome"] == "ignored"


async def test_a_setup_session_stores_the_card_once_even_when_replayed(
        store: Store, page: WebPage, stripe_api: FakeStripeApi) -> None:
    await account(store)
    stripe_api.replies[("GET", "/v1/setup_intents/seti_1")] = {
        "id": "seti_1", "object": "setup_intent", "customer": "cus_1",
        "payment_method": {"id": "pm_1", "object": "payment_method", "card": {
            "brand": "mastercard", "last4": "4444", "exp_month": 3, "exp_year": 2031}}}
    payload = event("evt_s", session("cs_setup", mode="setup"))
    assert (await deliver(page.url, payload)).json()["outcome"] == "card-stored"
    acct = await store.ledger.get("1001")
    assert (acct.card_token, acct.card_brand, acct.card_last4, acct.card_exp) == (
        "cus_1/pm_1", "mastercard", "4444", "03/31")
    b = Browser(page.url)
    await b.login()
    await b.post("/card/remove", {})
    await b.aclose()
    assert (await deliver(page.url, payload)).json()["outcome"] == "already"
    assert not (await store.ledger.get("1001")).has_card  # the removed card stays removed


async def test_checkout_sessions_are_made_through_the_stripe_sdk(
        store: Store, page: WebPage, stripe_api: FakeStripeApi) -> None:
    await account(store)
    stripe_api.replies[("POST", "/v1/checkout/sessions")] = {
        "id": "cs_test_new", "object": "checkout.session",
        "url": "https://checkout.stripe.com/c/pay/cs_test_new"}
    stripe_api.replies[("POST", "/v1/customers")] = {"id": "cus_new", "object": "customer"}
    b = Browser(page.url)
    await b.login()
    resp = await b.post("/credits", {"amount": "10.00"})
    assert resp.status_code == 303
    assert resp.headers["location"] == "https://checkout.stripe.com/c/pay/cs_test_new"
    assert "form-action 'self' https://checkout.stripe.com" in resp.headers[
        "content-security-policy"]
    [form] = [s[2] for s in stripe_api.seen if s[:2] == ("POST", "/v1/checkout/sessions")]
    got = {k: v[0] for k, v in form.items()}
    assert got["mode"] == "payment" and got["metadata[prepaid_account]"] == "1001"
    assert got["line_items[0][price_data][unit_amount]"] == "1000"
    assert got["line_items[0][price_data][currency]"] == "eur"
    assert got["success_url"].endswith("/credits/done?session_id={CHECKOUT_SESSION_ID}")
    resp = await b.post("/card/add", {})
    assert resp.status_code == 303
    setup = [s[2] for s in stripe_api.seen if s[:2] == ("POST", "/v1/checkout/sessions")][-1]
    assert setup["mode"] == ["setup"] and setup["customer"] == ["cus_new"]
    await b.aclose()


async def test_reconciliation_asks_stripe_for_what_no_webhook_brought(
        store: Store, stripe_api: FakeStripeApi, settings: Settings) -> None:
    await account(store)
    stripe_api.replies[("GET", "/v1/checkout/sessions")] = {
        "object": "list", "has_more": False, "url": "/v1/checkout/sessions",
        "data": [session("cs_lost", amount=5000), session("cs_unpaid", paid=False)]}
    checkout = StripeCheckout("sk_test_123", api_base=stripe_api.base)
    assert await fulfil.reconcile(store, checkout) == 1
    assert await fulfil.reconcile(store, checkout) == 0
    query = [s[2] for s in stripe_api.seen if s[:2] == ("GET", "/v1/checkout/sessions")][-1]
    assert query["status"] == ["complete"] and int(query["created[gte]"][0]) > 0
    # The webhook arriving late changes nothing (the page started only now: its own pass
    # must not race the one above).
    with WebPage(settings) as page:
        assert (await deliver(page.url, event("evt_l", session("cs_lost", amount=5000)))
                ).json()["outcome"] == "duplicate"
    assert (await store.ledger.get("1001")).balance == 62 * EUR


async def test_an_oversized_webhook_is_refused_unread(store: Store, page: WebPage) -> None:
    await account(store)
    obj = session("cs_big")
    obj["padding"] = "x" * 600_000
    payload = event("evt_big", obj)
    resp = await deliver(page.url, payload)
    assert resp.status_code == 413
    assert await credits(store) == []
