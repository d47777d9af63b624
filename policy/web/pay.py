"""Card on file and adding credit through the hosted payment page; the Stripe webhook; the
sandbox's own hosted page."""

from __future__ import annotations

import logging
from datetime import date

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from policy.cards import parse_expiry
from policy.commands import remove_card
from policy.gateway import SANDBOX_TOKENS
from policy.web import fulfil
from policy.web.checkout import SandboxCheckout, sandbox_card
from policy.web.context import Web
from policy.web.routes import render_account, web_of
from policy.web.session import WebSession
from policy.web.views import web_message
from prepaid.errors import InputError, StoreUnavailable
from prepaid.money import format_amount, parse_amount

log = logging.getLogger(__name__)

MAX_WEBHOOK_BYTES = 512 * 1024  # Stripe's events are a few kB


async def _form_session(web: Web, request: Request) -> tuple[WebSession | None, str]:
    session, form = await web.posted(request)
    return (session if session.logged_in else None), str(form.get("amount", ""))


async def add_card(request: Request) -> Response:
    web = web_of(request)
    session, _ = await _form_session(web, request)
    if session is None:
        return web.redirect("/login")
    acct = await web.store.ledger.get(session.account)
    customer = acct.card_token.partition("/")[0] if acct.card_token.startswith("cus_") else ""
    base = web.base_url(request)
    started = await web.checkout.start_setup(
        acct.id, customer, f"{base}/card/done?session_id={{CHECKOUT_SESSION_ID}}",
        f"{base}/account?n=cancelled")
    return web.redirect(started.url, session)


async def card_done(request: Request) -> Response:
    return await _returned(request, "card-stored", "card-pending")


async def credits_done(request: Request) -> Response:
    return await _returned(request, "paid", "payment-pending")


async def _returned(request: Request, done_notice: str, pending_notice: str) -> Response:
    """Back from the hosted page: fulfil now if the provider says it is complete (the
    webhook may come later, or never); the same session twice changes nothing."""
    web = web_of(request)
    session = web.session(request)
    if session is None or not session.logged_in:
        return web.redirect("/login")
    done = await web.checkout.find(request.query_params.get("session_id", ""))
    if done is None or done.account != session.account:
        return web.redirect(f"/account?n={pending_notice}", session)
    outcome = await fulfil.fulfil(web.store, web.checkout, done)
    ok = outcome.what in ("credited", "duplicate", "card-stored", "already")
    return web.redirect(f"/account?n={done_notice if ok else pending_notice}", session)


async def delete_card(request: Request) -> Response:
    web = web_of(request)
    session, _ = await _form_session(web, request)
    if session is None:
        return web.redirect("/login")
    _, switched = await remove_card(web.store, session.account)
    return web.redirect("/account?n=card-removed" + ("-topup-off" if switched else ""),
                        session)


async def add_credits(request: Request) -> Response:
    web = web_of(request)
    session, amount = await _form_session(web, request)
    if session is None:
        return web.redirect("/login")
    acct = await web.store.ledger.get(session.account)
    presets = web.settings.policy.presets
    try:
        micros = parse_amount(amount, decimals=web.settings.billing.decimals, what="amount")
        if micros not in presets:
            raise InputError("choose one of the amounts offered; for a larger one, ask "
                             "support below")
    except InputError as exc:
        return await render_account(web, request, session, 400,
                                    credits_error=web_message(str(exc)))
    base = web.base_url(request)
    started = await web.checkout.start_payment(
        acct.id, micros, acct.currency,
        f"{base}/credits/done?session_id={{CHECKOUT_SESSION_ID}}",
        f"{base}/account?n=cancelled")
    return web.redirect(started.url, session)


async def stripe_webhook(request: Request) -> Response:
    """Stripe's events, their signature checked by the SDK with ``[payments]
    stripe_webhook_secret``: 400 for a bad one (nothing done), 503 while Redis is down
    (Stripe delivers it again later)."""
    web = web_of(request)
    secret = web.settings.payments.stripe_webhook_secret
    if web.checkout.name != "stripe" or not secret:
        return JSONResponse({"error": "no webhook here"}, status_code=404)
    if int(request.headers.get("content-length") or 0) > MAX_WEBHOOK_BYTES:
        return JSONResponse({"error": "too large"}, status_code=413)
    payload = await request.body()
    if len(payload) > MAX_WEBHOOK_BYTES:  # sent chunked, without a length
        return JSONResponse({"error": "too large"}, status_code=413)
    try:
        event = fulfil.verify_event(payload, request.headers.get("stripe-signature", ""),
                                    secret)
    except ValueError as exc:
        log.warning("webhook refused: %s", exc)
        return JSONResponse({"error": "bad signature"}, status_code=400)
    try:
        outcome = await fulfil.on_event(web.store, web.checkout, event)
    except StoreUnavailable as exc:
        log.error("webhook %s not handled now (Stripe retries): %s", event.id, exc)
        return JSONResponse({"error": "unavailable"}, status_code=503)
    return JSONResponse({"outcome": outcome.what})


# -- the sandbox's hosted page ----------------------------------------------------------------

async def _sandbox_session(web: Web, request: Request) -> tuple[WebSession, dict[str, str]]:
    """The open sandbox session of the logged-in account; empty if it is not theirs."""
    session = web.session(request)
    assert isinstance(web.checkout, SandboxCheckout)
    rec = await web.checkout.record(request.path_params["sid"])
    if session is None or not rec or rec.get("account") != session.account:
        return session or WebSession("", ""), {}
    return session, rec


async def sandbox_page(request: Request) -> Response:
    web = web_of(request)
    session, rec = await _sandbox_session(web, request)
    if not rec or rec["status"] != "open":
        return web.render("message.html", session, 404, title="No such payment",
                          text="This payment page does not exist or is finished.")
    return web.render("sandbox_checkout.html", session, rec=rec, amount=_amount(rec))


def _amount(rec: dict[str, str]) -> str:
    return format_amount(int(rec["amount"]), rec["currency"]) if rec["mode"] == "payment" else ""


def _expiry(raw: str) -> str:
    month, year = parse_expiry(raw, "the expiry date")
    if (year, month) < (date.today().year, date.today().month):
        raise InputError("the card has expired")
    return f"{month:02d}/{year % 100:02d}"


async def sandbox_submit(request: Request) -> Response:
    web = web_of(request)
    session, form = await web.posted(request)
    _, rec = await _sandbox_session(web, request)
    if not rec or rec["status"] != "open":
        return web.render("message.html", session, 404, title="No such payment",
                          text="This payment page does not exist or is finished.")
    checkout = web.checkout
    assert isinstance(checkout, SandboxCheckout)
    try:
        token, brand, last4 = sandbox_card(str(form.get("number", "")))
        exp = _expiry(str(form.get("exp", "")))
        outcome = SANDBOX_TOKENS.get(token, SANDBOX_TOKENS["tok_ok"])
        if rec["mode"] == "payment" and not outcome.ok:
            raise InputError(f"payment refused: {outcome.reason}")
    except InputError as exc:
        return web.render("sandbox_checkout.html", session, 400, rec=rec, amount=_amount(rec),
                          error=str(exc))
    done = await checkout.complete(rec["id"], token, brand, last4, exp)
    if done is not None:
        await fulfil.fulfil(web.store, checkout, done)  # as the provider's webhook would
    return web.redirect(rec["success_url"], session)


ROUTES = [
    Route("/card/add", add_card, methods=["POST"]),
    Route("/card/done", card_done, methods=["GET"]),
    Route("/card/remove", delete_card, methods=["POST"]),
    Route("/credits", add_credits, methods=["POST"]),
    Route("/credits/done", credits_done, methods=["GET"]),
    Route("/webhook/stripe", stripe_webhook, methods=["POST"]),
]
SANDBOX_ROUTES = [
    Route("/sandbox/checkout/{sid}", sandbox_page, methods=["GET"]),
    Route("/sandbox/checkout/{sid}", sandbox_submit, methods=["POST"]),
]
