"""The "My account" web app (Starlette) and its server (uvicorn), which ``prepaid serve``
runs as the service ``web`` when ``[web] listen`` is set.

HTTPS with ``[web] cert``/``key``, or behind a reverse proxy that ends TLS
(``[web] proxy = true``: its X-Forwarded-Proto is believed from loopback only).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator, Sequence
from importlib import resources
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from policy.web import admin, fulfil, pay, routes
from policy.web.checkout import Checkout, SandboxCheckout, StripeCheckout
from policy.web.context import LOGIN_PER_MINUTE, Forbidden, Web, make_sessions, templates
from policy.web.security import SecureHeaders
from policy.web.session import RateLimit
from prepaid.config import Settings
from prepaid.errors import ConfigError, PrepaidError
from prepaid.listen import listening
from prepaid.redis_client import REDIS_ERRORS
from prepaid.store import Store

log = logging.getLogger(__name__)

STRIPE_CHECKOUT = "https://checkout.stripe.com"


def make_checkout(settings: Settings, store: Store) -> Checkout:
    pay_settings = settings.payments
    if pay_settings.gateway == "stripe":
        if not pay_settings.stripe_api_key:
            raise ConfigError(f"{settings.source}: [payments] gateway is \"stripe\" but no "
                              "stripe_api_key (or STRIPE_API_KEY) is set")
        return StripeCheckout(pay_settings.stripe_api_key, api_base=pay_settings.stripe_api_base)
    return SandboxCheckout(store.redis, settings.redis.key_prefix)


async def _css(request: Request) -> Response:
    css = resources.files("policy.web").joinpath("templates", "app.css").read_text("utf-8")
    return PlainTextResponse(css, media_type="text/css")


def build_app(store: Store, checkout: Checkout | None = None) -> Any:
    """The ASGI app: Starlette inside the security headers."""
    settings = store.settings
    checkout = checkout or make_checkout(settings, store)
    web = Web(store, checkout, make_sessions(settings), templates(),
              RateLimit(LOGIN_PER_MINUTE, 60.0))

    async def forbidden(request: Request, exc: Exception) -> Response:
        return HTMLResponse(web.templates.get_template("message.html").render(
            title="Refused", text="This form has expired or did not come from this page. "
            "Go back, reload the page and try again.", csrf="", account=""), status_code=403)

    async def unavailable(request: Request, exc: Exception) -> Response:
        web.outage.failure(exc)
        return HTMLResponse(web.templates.get_template("message.html").render(
            title="Unavailable", text="The service is unavailable just now; try again in a "
            "minute.", csrf="", account=""), status_code=503)

    extra = [*pay.SANDBOX_ROUTES] if isinstance(checkout, SandboxCheckout) else []
    app = Starlette(routes=[*routes.ROUTES, *pay.ROUTES, *admin.ROUTES, *extra,
                            Route("/static/app.css", _css)],
                    exception_handlers={Forbidden: forbidden, PrepaidError: unavailable,
                                        **{e: unavailable for e in REDIS_ERRORS}})
    app.state.web = web
    targets = [STRIPE_CHECKOUT] if checkout.name == "stripe" else []
    return SecureHeaders(app, https=settings.web.https, form_targets=targets)


def bind(settings: Settings) -> list[socket.socket]:
    """The listening sockets of ``[web] listen`` (prepaid.listen); ServeError if they
    cannot be had."""
    web = settings.web
    return listening(web.host, web.port, what=f"the web page on [web] listen {web.listen!r}",
                     backlog=128)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the service's own stop event ends it, not uvicorn's signal handlers


def server(settings: Settings, app: Any) -> uvicorn.Server:
    web = settings.web
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="off", server_header=False,
        ssl_certfile=str(web.cert) if web.cert else None,
        ssl_keyfile=str(web.key) if web.key else None,
        proxy_headers=web.proxy, forwarded_allow_ips="127.0.0.1,::1" if web.proxy else "",
        timeout_graceful_shutdown=5)
    return _Server(config)


async def run(store: Store, stop: asyncio.Event, *, socks: Sequence[socket.socket] = ()) -> None:
    """Serve the page until ``stop`` (on ``socks``, bound by ``prepaid serve``, else bound
    here), with the reconciliation pass beside it."""
    settings = store.settings
    socks = list(socks) or bind(settings)
    app = build_app(store)
    web: Web = app.app.state.web
    srv = server(settings, app)
    scheme = "https" if settings.web.cert else "http"
    log.info("web page on %s://%s", scheme, settings.web.listen)
    async with asyncio.TaskGroup() as tasks:
        serving = tasks.create_task(srv.serve(sockets=socks), name="web")
        tasks.create_task(fulfil.reconcile_forever(store, web.checkout, stop,
                                                   settings.web.reconcile_seconds),
                          name="reconcile")
        await stop.wait()
        srv.should_exit = True
        await serving
    for sock in socks:
        sock.close()
