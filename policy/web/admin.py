"""The admin's view of the web page: a separate role, logged in with the admin password,
that sees the accounts, the live calls and the support requests (and changes nothing).

The password is set with ``prepaid web-admin password`` (asked twice, or read from standard
input): only its scrypt hash is kept, in Redis, like the PINs; wrong attempts count in the
same kind of lock-out (prepaid/pins.py's limits).  An admin session is no customer's session
and a customer's is no admin's.
"""

from __future__ import annotations

import asyncio
import json
import sys

import click
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from policy.web import support, views
from policy.web.routes import web_of
from policy.web.session import WebSession, new_session
from prepaid import config as config_mod
from prepaid import holds, keys
from prepaid.config import Settings
from prepaid.errors import InputError
from prepaid.pins import attempt_allowed, hash_pin, pin_matches
from prepaid.redis_client import text
from prepaid.store import Store, open_store

ADMIN = "admin"  # the session's role
MIN_PASSWORD = 12
MAX_ACCOUNTS = 200  # shown on the page (the CLI lists them all)
async def set_password(store: Store, password: str) -> None:
    if len(password) < MIN_PASSWORD or not password.isprintable():
        raise InputError(f"the admin password must be at least {MIN_PASSWORD} printable "
                         "characters")
    prefix = store.settings.redis.key_prefix
    stored = await asyncio.to_thread(hash_pin, password)  # the PINs' scrypt hash
    await store.redis.set(keys.web_admin(prefix), stored)
    await store.redis.delete(keys.web_admin_fails(prefix))


async def check_password(store: Store, password: str) -> str:
    """"ok", "wrong" (also when none is set) or "locked"; every attempt counts first."""
    prefix = store.settings.redis.key_prefix
    if not await attempt_allowed(store.redis, keys.web_admin_fails(prefix)):
        return "locked"
    stored = await store.redis.get(keys.web_admin(prefix))
    if not stored or not await asyncio.to_thread(pin_matches, password[:200], text(stored)):
        return "wrong"
    await store.redis.delete(keys.web_admin_fails(prefix))
    return "ok"


# -- pages ---------------------------------------------------------------------------------

def _admin(request: Request) -> WebSession | None:
    session = web_of(request).session(request)
    return session if session is not None and session.role == ADMIN else None


async def login_form(request: Request) -> Response:
    web = web_of(request)
    session = web.session(request) or new_session()
    if session.role == ADMIN:
        return web.redirect("/admin", session)
    return web.render("admin_login.html", session)


async def login(request: Request) -> Response:
    web = web_of(request)
    client = request.client.host if request.client else "-"
    if not web.login_limit.allow(client):
        return web.render("admin_login.html", web.session(request) or new_session(), 429,
                          error="Too many log-in attempts from your address; wait a minute.")
    session, form = await web.posted(request)
    outcome = await check_password(web.store, str(form.get("password", "")))
    if outcome == "ok":
        return web.redirect("/admin", session.as_admin())
    error = ("Too many wrong passwords: the admin log-in is locked for 15 minutes."
             if outcome == "locked" else "The password is not right.")
    return web.render("admin_login.html", session, 429 if outcome == "locked" else 401,
                      error=error)


async def overview(request: Request) -> Response:
    web = web_of(request)
    session = _admin(request)
    if session is None:
        return web.redirect("/admin/login")
    ledger = web.store.ledger
    ids = await ledger.list_ids()
    accounts, live = [], []
    for account_id in ids[:MAX_ACCOUNTS]:
        acct = await ledger.get(account_id)
        cur = acct.currency
        accounts.append({"id": acct.id, "status": acct.status,
                         "balance": views.money(acct.balance, cur),
                         "held": views.money(acct.held, cur),
                         "policy": views.policy_view(acct)["label"],
                         "card": (f"{acct.card_brand} {acct.card_last4}" if acct.has_card
                                  else "-")})
        if acct.held:
            live += [{"account": h.account, "ref": h.ref or h.hold, "state": h.state or "-",
                      "held": views.money(h.amount, cur), "server": h.owner or "-",
                      "age": "-" if h.age is None else f"{int(h.age)} s"}
                     for h in await holds.list_holds(ledger, acct.id)]
    requests = [{"time": views.stamp(r.time), "account": r.account,
                 "amount": views.money(r.amount, r.currency), "note": r.note,
                 "state": "credited" if r.credited else "open",
                 "approve": "" if r.credited else r.command()}
                for r in await support.requests(web.store, 50)]
    return web.render("admin.html", session, accounts=accounts, total=len(ids), live=live,
                      requests=requests, shown=MAX_ACCOUNTS)


ROUTES = [
    Route("/admin/login", login_form, methods=["GET"]),
    Route("/admin/login", login, methods=["POST"]),
    Route("/admin", overview, methods=["GET"]),
]


# -- the command ----------------------------------------------------------------------------

def _settings() -> Settings:
    obj = click.get_current_context().find_root().obj
    settings = getattr(obj, "settings", None)
    return settings if isinstance(settings, Settings) else config_mod.load()


@click.group("web-admin")
def web_admin() -> None:
    """The admin's log-in to the web page (/admin)."""


@web_admin.command("password")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def admin_password(as_json: bool) -> None:
    """Set the admin password of the web page, asked twice and not echoed; read from
    standard input when it is not a terminal."""
    password = (click.prompt("New admin password", hide_input=True, confirmation_prompt=True)
                if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n"))

    async def go() -> None:
        store = await open_store(_settings())
        try:
            await set_password(store, password)
        finally:
            await store.close()
    asyncio.run(go())  # a PrepaidError: the CLI's one line, exit status 1
    click.echo(json.dumps({"web_admin": "password set"}) if as_json
               else "web admin password set")
