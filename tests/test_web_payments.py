"""Card on file and adding credit on the web page with the sandbox gateway's hosted page,
over HTTP against the real server; support requests and their approval by the admin."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from policy.web import fulfil
from policy.web.checkout import SandboxCheckout
from prepaid.config import Settings
from prepaid.redis_client import text
from prepaid.store import Store, open_store
from testbed.web import WebPage
from tests.conftest import Run, cli
from tests.test_policy_support import EUR, Smtp, body, mailer, smtp, wait_until
from tests.web_fixtures import Browser, account, page, settings, store, web_settings

__all__ = ["page", "settings", "smtp", "store"]  # fixtures


async def everything_in_redis(st: Store) -> str:
    """Every key and value of the test's Redis as text, to look for a card number."""
    out = []
    async for key in st.redis.scan_iter(count=1000):
        kind = text(await st.redis.type(key))
        if kind == "string":
            out.append(repr(await st.redis.get(key)))
        elif kind == "hash":
            out.append(repr(await st.redis.hgetall(key)))
        elif kind == "stream":
            out.append(repr(await st.redis.xrange(key)))
        elif kind == "zset":
            out.append(repr(await st.redis.zrange(key, 0, -1)))
        out.append(repr(key))
    return "\n".join(out)


async def store_card(b: Browser, number: str = "4242 4242 4242 4242") -> str:
    started = await b.post("/card/add", {})
    assert started.status_code == 303
    hosted = started.headers["location"]
    assert hosted.startswith("/sandbox/checkout/cs_sandbox_")
    shown = await b.get(hosted)
    assert shown.status_code == 200 and "SANDBOX" in shown.text and "Save card" in shown.text
    done = await b.post(hosted, {"number": number, "exp": "12/39"})
    assert done.status_code == 303, done.text
    return str(done.headers["location"])


async def test_a_card_is_stored_through_the_hosted_page_and_never_its_number(
        store: Store, page: WebPage) -> None:
    await account(store)
    b = Browser(page.url)
    await b.login()
    started = await b.post("/card/add", {})
    hosted = started.headers["location"]
    await b.get(hosted)
    # A number that is not one of the sandbox's test cards is refused, and not repeated.
    refused = await b.post(hosted, {"number": "4111 1111 1111 1111", "exp": "12/39"})
    assert refused.status_code == 400 and "test card numbers" in refused.text
    assert "4111" not in refused.text
    assert not (await store.ledger.get("1001")).has_card
    done = await b.post(hosted, {"number": "4242 4242 4242 4242", "exp": "12/39"})
    assert done.headers["location"].startswith(f"{page.url}/card/done?session_id=cs_sandbox_")
    back = await b.get(done.headers["location"])
    assert back.headers["location"] == "/account?n=card-stored"
    acct = await store.ledger.get("1001")
    assert (acct.card_token, acct.card_brand, acct.card_last4, acct.card_exp) == (
        "tok_ok", "visa", "4242", "12/39")
    shown = await b.get("/account?n=card-stored")
    assert "Visa ending 4242, expires 12/39" in shown.text
    dump = await everything_in_redis(store)
    for digits in ("4242424242424242", "4242 4242 4242 4242", "4111111111111111"):
        assert digits not in dump
    # The finished page cannot be used again.
    assert (await b.get(hosted)).status_code == 404
    await b.aclose()


async def test_topup_automatically_then_removing_the_card_turns_it_off(
        store: Store, page: WebPage) -> None:
    await account(store)
    b = Browser(page.url)
    await b.login()
    await b.get(await store_card(b))
    resp = await b.post("/account/policy", {"action": "topup", "threshold": "5",
                                            "amount": "20"})
    assert resp.status_code == 303
    acct = await store.ledger.get("1001")
    assert (acct.action, acct.threshold, acct.topup_amount, acct.policy_enabled) == (
        "topup", 5 * EUR, 20 * EUR, True)
    assert "we add EUR 20.00 from your card" in (await b.get("/account")).text
    # Above [policy] max_topup: the CLI's rule, the page's words.
    resp = await b.post("/account/policy", {"action": "topup", "threshold": "5",
                                            "amount": "500"})
    assert resp.status_code == 400 and "the maximum top-up" in resp.text
    resp = await b.post("/card/remove", {})
    assert resp.headers["location"] == "/account?n=card-removed-topup-off"
    acct = await store.ledger.get("1001")
    assert not acct.has_card and acct.action == "email"
    await b.aclose()


async def test_credits_from_a_preset_are_paid_on_the_hosted_page_and_credited_once(
        store: Store, page: WebPage, smtp: Smtp) -> None:
    await account(store)
    b = Browser(page.url)
    await b.login()
    assert (await b.post("/credits", {"amount": "7.00"})).status_code == 400  # not a preset
    started = await b.post("/credits", {"amount": "10.00"})
    hosted = started.headers["location"]
    shown = await b.get(hosted)
    assert "Pay EUR 10.00" in shown.text
    declined = await b.post(hosted, {"number": "4000 0000 0000 0002", "exp": "12/39"})
    assert declined.status_code == 400 and "declined" in declined.text
    assert (await store.ledger.get("1001")).balance == 12 * EUR
    paid = await b.post(hosted, {"number": "4242424242424242", "exp": "12/39"})
    sid = paid.headers["location"].rsplit("=", 1)[1]
    assert (await store.ledger.get("1001")).balance == 22 * EUR
    for _ in range(2):  # the return page twice (a reload): nothing more
        back = await b.get(paid.headers["location"])
        assert back.headers["location"] == "/account?n=paid"
    assert (await b.post(hosted, {"number": "4242424242424242", "exp": "12/39"})
            ).status_code == 404
    assert (await store.ledger.get("1001")).balance == 22 * EUR
    [entry] = [e for e in await store.ledger.history("1001") if e.ref == sid]
    assert (entry.kind, entry.amount, entry.balance) == ("credit", 10 * EUR, 22 * EUR)
    m = mailer(store)
    await m.ensure_group()
    await wait_until(lambda: _sent(m))
    [mail] = smtp.messages
    assert mail["To"] == "ann@example.org" and mail["Subject"] == "Top-up of EUR 10.00 received"
    assert sid in body(mail) and "New balance: EUR 22.00" in body(mail)
    await b.aclose()


async def _sent(m: Any) -> bool:
    return bool(await m.process_batch(50))


async def test_reconciliation_credits_a_completed_payment_nobody_reported_once(
        store: Store) -> None:
    await account(store)
    checkout = SandboxCheckout(store.redis, store.settings.redis.key_prefix)
    started = await checkout.start_payment("1001", 20 * EUR, "EUR", "http://x/{CHECKOUT_SESSION_ID}",
                                           "http://x/")
    await checkout.complete(started.id, "tok_ok", "visa", "4242", "12/39")  # then nothing
    assert (await store.ledger.get("1001")).balance == 12 * EUR
    assert await fulfil.reconcile(store, checkout) == 1
    assert await fulfil.reconcile(store, checkout) == 0
    assert (await store.ledger.get("1001")).balance == 32 * EUR
    open_one = await checkout.start_payment("1001", 5 * EUR, "EUR", "http://x/", "http://x/")
    assert await fulfil.reconcile(store, checkout) == 0  # not paid: nothing
    assert open_one.id not in [c.id for c in await checkout.completed_since(0)]


@pytest.fixture
def support_settings(redis_url: str, smtp: Smtp) -> Settings:
    return web_settings(redis_url, smtp.port, support_email="support@pbx.test")


async def test_a_support_request_reaches_the_admin_who_approves_it_once(
        support_settings: Settings, smtp: Smtp, tmp_path: Path) -> None:
    st = await open_store(support_settings)
    await account(st)
    conf = tmp_path / "prepaid.toml"
    conf.write_text(f'[redis]\nurl = "{support_settings.redis.url}"\n[policy]\n'
                    'max_topup = "100"\n')
    run: Run = cli(conf)
    with WebPage(support_settings) as web:
        b = Browser(web.url)
        await b.login()
        bad = await b.post("/support", {"amount": "lots", "note": "x"})
        assert bad.status_code == 400
        resp = await b.post("/support", {"amount": "250.00",
                                         "note": "Conference week,\r\nSubject: injected"})
        assert resp.headers["location"] == "/account?n=requested"
        await b.aclose()
    listed = await asyncio.to_thread(run, "requests", "--json")
    [req] = json.loads(listed.output)
    assert (req["account"], req["amount"], req["credited"]) == ("1001", "250.00", False)
    assert req["note"] == "Conference week, Subject: injected"  # one line
    assert req["approve"] == (f"prepaid topup 1001 250.00 --override --reference "
                              f"{req['reference']}")
    m = mailer(st)
    await m.ensure_group()
    await wait_until(lambda: _sent(m))
    [mail] = smtp.messages
    assert mail["To"] == "support@pbx.test"
    assert mail["Subject"] == "Support request: top-up of EUR 250.00 for account 1001"
    assert req["approve"] in body(mail)
    # Above max_topup without --override: refused, as for any top-up.
    refused = await asyncio.to_thread(run, "topup", "1001", "250.00", "--reference",
                                      req["reference"])
    assert refused.exit_code == 1
    for _ in range(2):
        await asyncio.to_thread(run, *req["approve"].split()[1:])
    assert (await st.ledger.get("1001")).balance == 262 * EUR
    listed = await asyncio.to_thread(run, "requests", "--json")
    assert json.loads(listed.output)[0]["credited"] is True
    # The ledger forgets idempotency keys after its window; the request stays credited.
    for bucket in [*st.ledger.idempotency_buckets("1001"), st.ledger.keys("1001")[3]]:
        await st.redis.delete(bucket)
    listed = await asyncio.to_thread(run, "requests", "--json")
    assert json.loads(listed.output)[0]["credited"] is True
    assert "no support requests" in (await asyncio.to_thread(run, "requests", "--open")).output
    await st.close()
