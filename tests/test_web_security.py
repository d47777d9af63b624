"""The web page's log-in and its defences, over HTTP against the real server (uvicorn, Redis):
brute force, CSRF, one account against another, cookie flags, CSP, HTTPS."""

from __future__ import annotations

import logging
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from policy.web.session import COOKIE, Sessions, WebSession
from prepaid.config import Settings
from prepaid.pins import LOCK_SECONDS, MAX_FAILURES, PinCheck, verify_pin
from prepaid.redis_client import REDIS_ERRORS
from prepaid.store import Store
from testbed.servers import RedisServer
from testbed.web import WebPage
from tests.test_policy_support import EUR, Smtp, smtp, wait_until
from tests.web_fixtures import (
    PIN,
    Browser,
    account,
    csrf_of,
    page,
    settings,
    store,
    web_settings,
)

__all__ = ["page", "settings", "smtp", "store"]  # fixtures


async def test_log_in_with_account_and_pin_shows_the_account(store: Store, page: WebPage) -> None:
    await account(store)
    b = Browser(page.url)
    resp = await b.login()
    assert resp.status_code == 303 and resp.headers["location"] == "/account"
    shown = await b.get("/account")
    assert shown.status_code == 200
    assert 'id="balance">EUR 12.00<' in shown.text and "Account 1001" in shown.text
    await b.aclose()


async def test_no_pin_and_a_wrong_pin_look_the_same(store: Store, page: WebPage) -> None:
    await account(store, "1001")
    await account(store, "1002", pin=None)
    answers = []
    for acct in ("1001", "1002", "9999"):  # wrong PIN, no PIN, no such account
        b = Browser(page.url)
        resp = await b.login(acct, "1111")
        answers.append((resp.status_code,
                        resp.text.replace(b.csrf, "").replace(f'value="{acct}"', "")))
        await b.aclose()
    assert answers[0][0] == 401
    assert answers[0] == answers[1] == answers[2]
    assert "The account number or PIN is not right." in answers[0][1]


async def test_a_brute_force_is_locked_out_for_the_phone_too(store: Store,
                                                             page: WebPage) -> None:
    await account(store)
    b = Browser(page.url)
    for guess in range(MAX_FAILURES):
        resp = await b.login("1001", f"{9000 + guess}")
        assert resp.status_code == 401
    resp = await b.login("1001", PIN)  # the right PIN, too late
    assert resp.status_code == 429 and "locked for 15 minutes" in resp.text
    assert (await b.get("/account")).status_code == 303  # not logged in: to the log-in page
    # The lock-out is the core's, shared with the phone menu.
    assert await verify_pin(store.ledger, "1001", PIN) is PinCheck.LOCKED
    ttl = await store.redis.ttl(store.ledger.account_key("1001") + ":pin-fails")
    assert 0 < ttl <= LOCK_SECONDS
    await b.aclose()


async def test_one_address_trying_many_accounts_is_slowed(store: Store, page: WebPage) -> None:
    b = Browser(page.url)
    codes = [(await b.login(f"acct{n}", "1234")).status_code for n in range(21)]
    assert codes[:20] == [401] * 20 and codes[20] == 429
    await b.aclose()


async def test_a_post_without_the_csrf_token_is_refused(store: Store, page: WebPage) -> None:
    await account(store)
    anon = Browser(page.url)
    await anon.get("/login")
    resp = await anon.post("/login", {"account": "1001", "pin": PIN}, csrf=False)
    assert resp.status_code == 403
    b = Browser(page.url)
    await b.login()
    before = await store.ledger.get("1001")
    for form in ({"action": "email", "threshold": "5"},
                 {"action": "email", "threshold": "5", "csrf": "not-the-token"},
                 {"action": "email", "threshold": "5", "csrf": anon.csrf}):  # another session's
        resp = await b.post("/account/policy", form, csrf=False)
        assert resp.status_code == 403
    for path in ("/card/remove", "/card/add", "/credits", "/support", "/logout"):
        assert (await b.post(path, {"amount": "10"}, csrf=False)).status_code == 403
    assert await store.ledger.get("1001") == before
    await b.aclose()
    await anon.aclose()


async def test_one_account_cannot_read_or_change_another(store: Store, page: WebPage,
                                                         settings: Settings) -> None:
    await account(store, "1001", balance=12 * EUR)
    await account(store, "1002", balance=77 * EUR, pin="8765")
    a = Browser(page.url)
    await a.login("1001")
    shown = await a.get("/account?account=1002&id=1002")
    assert "EUR 12.00" in shown.text and "EUR 77.00" not in shown.text
    resp = await a.post("/account/policy", {"action": "email", "threshold": "5",
                                            "account": "1002"})
    assert resp.status_code == 303
    assert (await store.ledger.get("1001")).action == "email"
    assert (await store.ledger.get("1002")).action == "none"
    # 1002's own hosted payment page is not 1001's to see or complete.
    other = Browser(page.url)
    await other.login("1002", "8765")
    started = await other.post("/credits", {"amount": "10.00"})
    sandbox = started.headers["location"]
    assert sandbox.startswith("/sandbox/checkout/")
    assert (await a.get(sandbox)).status_code == 404
    resp = await a.post(sandbox, {"number": "4242424242424242", "exp": "12/39"})
    assert resp.status_code == 404
    assert (await store.ledger.get("1002")).balance == 77 * EUR
    # A cookie naming 1002 that the server did not sign is no session.
    cookie = a.http.cookies[COOKIE]
    forged = Sessions("another secret", 1800, False).dump(WebSession("1002", a.csrf))
    payload, stamp_, signature = cookie.split(".")
    swapped = "A" if payload[-2] != "A" else "B"
    tampered = f"{payload[:-2]}{swapped}{payload[-1]}.{stamp_}.{signature}"
    for value in (forged, tampered):
        intruder = Browser(page.url, cookies={COOKIE: value})
        assert (await intruder.get("/account")).status_code == 303
        await intruder.aclose()
    await a.aclose()
    await other.aclose()


async def test_the_session_cookie_is_httponly_and_samesite(store: Store, page: WebPage) -> None:
    await account(store)
    b = Browser(page.url)
    await b.get("/login")
    resp = await b.post("/login", {"account": "1001", "pin": PIN})
    cookie = resp.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    flags = [p.strip().lower() for p in cookie.split(";")[1:]]
    assert "httponly" in flags and "samesite=lax" in flags and "path=/" in flags
    assert "max-age=1800" in flags
    assert "secure" not in flags  # plain HTTP on loopback: a Secure cookie would be dropped
    await b.aclose()


@pytest.fixture
def tls_pair(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_over_https_the_cookie_is_secure_and_hsts_is_sent(
        redis_url: str, smtp: Smtp, store: Store, tls_pair: tuple[Path, Path]) -> None:
    cert, key = tls_pair
    await account(store)
    with WebPage(web_settings(redis_url, smtp.port, cert=cert, key=key)) as tls:
        assert tls.url.startswith("https://")
        b = Browser(tls.url, verify=ssl.create_default_context(cafile=str(cert)))
        resp = await b.get("/login")
        assert resp.headers["strict-transport-security"].startswith("max-age=31536000")
        assert "secure" in [p.strip().lower() for p in resp.headers["set-cookie"].split(";")]
        assert (await b.login()).status_code == 303
        await b.aclose()
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port is no page
            await httpx.AsyncClient().get(tls.url.replace("https", "http") + "/login")


async def test_every_response_carries_the_csp(store: Store, page: WebPage) -> None:
    await account(store)
    b = Browser(page.url)
    seen = [await b.get("/login"), await b.get("/"), await b.get("/account"),
            await b.get("/no/such/page"), await b.get("/static/app.css"),
            await b.post("/login", {"account": "1001"}, csrf=False),
            await b.post("/webhook/stripe", {}), await b.http.put("/login")]
    await b.login()
    seen += [await b.get("/account"), await b.get("/sandbox/checkout/cs_sandbox_nope"),
             await b.post("/account/policy", {"action": "bogus"}),
             await b.post("/credits", {"amount": "7.00"})]
    statuses = sorted({r.status_code for r in seen})
    assert statuses == [200, 303, 400, 403, 404, 405]
    for resp in seen:
        policy = resp.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        assert "script-src" not in policy  # no script at all
        assert resp.headers["x-frame-options"] == "DENY"
        assert "strict-transport-security" not in resp.headers  # not HTTPS here
    await b.aclose()


async def test_the_policy_form_follows_the_cli_rules(store: Store, page: WebPage) -> None:
    await account(store)
    b = Browser(page.url)
    await b.login()
    resp = await b.post("/account/policy", {"action": "email", "threshold": "abc"})
    assert resp.status_code == 400 and "The threshold" in resp.text
    resp = await b.post("/account/policy", {"action": "topup", "threshold": "5",
                                            "amount": "20"})
    assert resp.status_code == 400 and "has no stored card" in resp.text
    resp = await b.post("/account/policy", {"action": "email", "threshold": "0"})
    assert resp.status_code == 400 and "above zero" in resp.text
    assert (await store.ledger.get("1001")).action == "none"
    resp = await b.post("/account/policy", {"action": "email", "threshold": "5"})
    assert (resp.status_code, resp.headers["location"]) == (303, "/account?n=saved")
    acct = await store.ledger.get("1001")
    assert (acct.action, acct.threshold, acct.policy_enabled) == ("email", 5 * EUR, True)
    shown = await b.get("/account?n=saved")
    assert "Your low-balance setting is saved." in shown.text
    assert "When the balance falls below EUR 5.00, we e-mail ann@example.org." in shown.text
    await b.aclose()


async def test_history_and_calls_are_paged(store: Store, page: WebPage, settings: Settings
                                           ) -> None:
    await account(store, balance=0)
    for n in range(1, 24):
        await store.ledger.credit("1001", n * EUR, key=f"k{n}", ref=f"ref-{n:02d}")
    calls = store.ledger.account_key("1001") + ":calls"
    for n in range(12):
        await store.redis.xadd(calls, {"ref": f"c{n}", "number": f"35387000{n:04d}",
                                       "answered": "1700000000", "ended": "1700000060",
                                       "billed": "60", "cost": "123000"})
    b = Browser(page.url)
    await b.login()
    first = (await b.get("/account")).text
    assert "ref-23" in first and "ref-14" in first and "ref-13" not in first
    assert 'id="history-older"' in first and 'id="calls-older"' in first
    second = (await b.get("/account?h=1")).text
    assert "ref-13" in second and "ref-04" in second and "ref-14" not in second
    third = (await b.get("/account?h=2")).text
    assert "ref-01" in third and "opening" not in third and 'id="history-older"' not in third
    assert "353870000011" in first and "353870000001" not in first
    assert "353870000001" in (await b.get("/account?c=1")).text
    await b.aclose()


async def test_redis_away_the_page_answers_503_logs_once_and_recovers(
        store: Store, page: WebPage, redis_server: RedisServer,
        caplog: pytest.LogCaptureFixture) -> None:
    await account(store)
    b = Browser(page.url)
    await b.login()
    redis_server.stop()  # the data goes with it: --save "" (a fresh Redis comes back)
    try:
        with caplog.at_level(logging.DEBUG, logger="policy.web.context"):
            answers = [await b.get("/account"), await b.get("/account"),
                       await b.post("/account/policy", {"action": "email", "threshold": "5"})]
        assert [a.status_code for a in answers] == [503, 503, 503]
        assert all("The service is unavailable just now" in a.text for a in answers)
        assert all("content-security-policy" in a.headers for a in answers)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "unavailable" in errors[0].getMessage()
    finally:
        redis_server.start()
    await wait_until(lambda: _pings(store))  # the test's own pooled connection was cut
    await account(store)  # the new Redis is empty
    with caplog.at_level(logging.INFO, logger="policy.web.context"):
        assert (await b.get("/account")).status_code == 200
    assert any("recovered after 3 failure(s)" in r.getMessage() for r in caplog.records)
    await b.aclose()


async def _pings(st: Store) -> bool:
    try:
        return bool(await st.redis.ping())
    except REDIS_ERRORS:
        return False


async def test_behind_a_reverse_proxy_its_headers_count_from_loopback(
        redis_url: str, smtp: Smtp, store: Store) -> None:
    await account(store)
    with WebPage(web_settings(redis_url, smtp.port, proxy=True)) as proxied:
        # nginx on this host: X-Forwarded-Proto https makes the page HTTPS.
        b = Browser(proxied.url, headers={"X-Forwarded-Proto": "https"})
        resp = await b.get("/login")
        assert resp.headers["strict-transport-security"].startswith("max-age=31536000")
        assert "secure" in [p.strip().lower() for p in resp.headers["set-cookie"].split(";")]
        await b.aclose()
        # Each customer's address is the one the proxy names: one busy client does not
        # slow the others down.
        codes = []
        async with httpx.AsyncClient(base_url=proxied.url) as http:
            for n in range(22):
                who = {"X-Forwarded-For": f"198.51.100.{n}", "X-Forwarded-Proto": "https"}
                form = await http.get("/login", headers=who)
                # The cookie is Secure: the browser sends it over HTTPS to nginx; here by hand.
                cookie = form.headers["set-cookie"].split(";")[0]
                resp = await http.post("/login", headers={**who, "Cookie": cookie}, data={
                    "csrf": csrf_of(form.text), "account": f"acct{n}", "pin": "1234"})
                codes.append(resp.status_code)
        assert codes == [401] * 22
