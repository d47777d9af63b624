"""The pages of "My account": log-in, the account page and its forms.

The account is always the session's: no handler reads an account id from the URL or a
form, except the log-in form itself.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from policy.commands import set_policy
from policy.web import support, views
from policy.web.context import Web
from policy.web.session import WebSession, new_session
from prepaid import keys
from prepaid.config import ACTIONS
from prepaid.errors import InputError, UnknownAccount
from prepaid.ledger import check_account_id
from prepaid.pins import PinCheck, verify_pin
from prepaid.redis_client import text

log = logging.getLogger(__name__)

WRONG = "The account number or PIN is not right."
LOCKED = "Too many wrong PINs: this account's self-service is locked for 15 minutes."
TOO_FAST = "Too many log-in attempts from your address; wait a minute."


def web_of(request: Request) -> Web:
    return cast(Web, request.app.state.web)


async def home(request: Request) -> Response:
    web = web_of(request)
    session = web.session(request)
    return web.redirect("/account" if session and session.logged_in else "/login")


async def login_form(request: Request) -> Response:
    web = web_of(request)
    session = web.session(request) or new_session()
    if session.logged_in:
        return web.redirect("/account", session)
    notice = views.NOTICES.get(request.query_params.get("n", ""), "")
    return web.render("login.html", session, notice=notice)


async def login(request: Request) -> Response:
    web = web_of(request)
    client = request.client.host if request.client else "-"
    if not web.login_limit.allow(client):
        return web.render("login.html", web.session(request) or new_session(), 429,
                          error=TOO_FAST)
    session, form = await web.posted(request)
    account, pin = str(form.get("account", "")).strip(), str(form.get("pin", ""))
    try:
        check_account_id(account)
    except InputError:
        return web.render("login.html", session, 401, error=WRONG, account_value=account[:64])
    result = await verify_pin(web.store.ledger, account, pin[:64])
    if result is PinCheck.OK:
        log.info("web log-in of account %s", account)
        return web.redirect("/account", session.as_account(account))
    if result is PinCheck.LOCKED:
        return web.render("login.html", session, 429, error=LOCKED, account_value=account)
    # NO_PIN and WRONG look the same: a guesser learns nothing of which accounts exist.
    return web.render("login.html", session, 401, error=WRONG, account_value=account)


async def logout(request: Request) -> Response:
    web = web_of(request)
    await web.posted(request)
    response = web.redirect("/login?n=logged-out")
    web.keep(response, None)
    return response


def _logged_in(web: Web, request: Request) -> WebSession | None:
    session = web.session(request)
    return session if session is not None and session.logged_in else None


async def account_page(request: Request) -> Response:
    web = web_of(request)
    session = _logged_in(web, request)
    if session is None:
        return web.redirect("/login")
    notice = views.NOTICES.get(request.query_params.get("n", ""), "")
    return await render_account(web, request, session, notice=notice)


async def render_account(web: Web, request: Request, session: WebSession, status: int = 200,
                         **extra: Any) -> Response:
    store, size = web.store, web.settings.web.page_size
    try:
        acct = await store.ledger.get(session.account)
    except UnknownAccount:
        response = web.redirect("/login")
        web.keep(response, None)
        return response
    hpage = views.page_number(request.query_params.get("h"))
    cpage = views.page_number(request.query_params.get("c"))
    entries = await store.ledger.history(acct.id, limit=(hpage + 1) * size + 1)
    history, hinfo = views.page_of(entries, hpage, size)
    calls_key = keys.account_calls(store.settings.redis.key_prefix, acct.id)
    raw: Any = await store.redis.xrevrange(calls_key, count=(cpage + 1) * size + 1)
    calls = [{text(k): text(v) for k, v in (f or {}).items()} for _, f in raw or []]
    call_page, cinfo = views.page_of(calls, cpage, size)
    cur = acct.currency
    return web.render(
        "account.html", session, status, acct=acct,
        balance=views.money(acct.balance, cur), held=views.money(acct.held, cur),
        available=views.money(acct.available, cur),
        history=views.history_rows(history, cur), hpage=hinfo, cpage=cinfo,
        calls=views.call_rows(call_page, cur), policy=views.policy_view(acct),
        actions=views.ACTION_LABELS, card=views.card_view(acct),
        presets=[views.money(p, cur) for p in web.settings.policy.presets],
        preset_values=[views.money(p, "") for p in web.settings.policy.presets],
        max_topup=views.money(web.settings.policy.max_topup, cur),
        gateway=web.checkout.name, **extra)


async def save_policy(request: Request) -> Response:
    web = web_of(request)
    session, form = await web.posted(request)
    if not session.logged_in:
        return web.redirect("/login")
    action = str(form.get("action", ""))
    threshold = str(form.get("threshold", "")).strip() or None
    amount = str(form.get("amount", "")).strip() or None
    try:
        if action not in ACTIONS:
            raise InputError("choose what happens when the balance is low")
        # The same rules and fields as `prepaid policy` (policy/commands.py).
        await set_policy(web.store, session.account, action=action, threshold=threshold,
                         amount=None if action != "topup" else amount)
    except InputError as exc:
        return await render_account(web, request, session, 400,
                                    policy_error=views.web_message(str(exc)))
    return web.redirect("/account?n=saved", session)


async def support_request(request: Request) -> Response:
    web = web_of(request)
    session, form = await web.posted(request)
    if not session.logged_in:
        return web.redirect("/login")
    acct = await web.store.ledger.get(session.account)
    try:
        await support.submit(web.store, acct, str(form.get("amount", "")),
                             str(form.get("note", "")))
    except InputError as exc:
        return await render_account(web, request, session, 400,
                                    support_error=views.web_message(str(exc)))
    return web.redirect("/account?n=requested", session)


ROUTES = [
    Route("/", home),
    Route("/login", login_form, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
    Route("/account", account_page, methods=["GET"]),
    Route("/account/policy", save_policy, methods=["POST"]),
    Route("/support", support_request, methods=["POST"]),
]
