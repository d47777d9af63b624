"""What every handler of the web page shares: the store, the hosted payment page, the
sessions, the templates; and the steps every page takes (its session, its CSRF check,
rendering with the session cookie)."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from policy.web.checkout import Checkout
from policy.web.session import COOKIE, CSRF_FIELD, RateLimit, Sessions, WebSession, csrf_ok
from prepaid.config import Settings
from prepaid.outage import OutageLog
from prepaid.store import Store

log = logging.getLogger(__name__)

LOGIN_PER_MINUTE = 20  # log-in attempts from one address (the PIN lock-out is per account)


class Forbidden(Exception):
    """A form posted without this session's CSRF token."""


@dataclass
class Web:
    store: Store
    checkout: Checkout
    sessions: Sessions
    templates: Environment
    login_limit: RateLimit
    # Redis or the payment provider away: one ERROR line per outage, not one per page.
    outage: OutageLog = field(default_factory=lambda: OutageLog(log, "the web page's Redis "
                                                                     "or payment provider"))

    @property
    def settings(self) -> Settings:
        return self.store.settings

    # -- sessions ----------------------------------------------------------------------
    def session(self, request: Request) -> WebSession | None:
        return self.sessions.load(request.cookies.get(COOKIE))

    async def posted(self, request: Request) -> tuple[WebSession, FormData]:
        """The form of a POST and its session; Forbidden without the session's token."""
        form = await request.form(max_files=0, max_fields=20, max_part_size=4096)
        session = self.session(request)
        if session is None or not csrf_ok(session, form.get(CSRF_FIELD)):
            raise Forbidden()
        return session, form

    # -- responses ---------------------------------------------------------------------
    def render(self, name: str, session: WebSession, status: int = 200,
               **context: Any) -> Response:
        page = self.templates.get_template(name).render(
            csrf=session.csrf, account=session.account, role=session.role, **context)
        response = HTMLResponse(page, status_code=status)
        self.keep(response, session)
        self.outage.success()
        return response

    def keep(self, response: Response, session: WebSession | None) -> None:
        """(Re)send the session cookie: a fresh time stamp, so it expires when idle."""
        response.headers.append("set-cookie", self.sessions.cookie_header(session))

    def redirect(self, url: str, session: WebSession | None = None) -> Response:
        response = RedirectResponse(url, status_code=303)
        if session is not None:
            self.keep(response, session)
        return response

    def base_url(self, request: Request) -> str:
        return (self.settings.web.public_url or str(request.base_url)).rstrip("/")


def templates() -> Environment:
    return Environment(loader=PackageLoader("policy.web", "templates"),
                       autoescape=select_autoescape(default=True), auto_reload=False)


def make_sessions(settings: Settings) -> Sessions:
    web = settings.web
    # No secret configured: a random one, so sessions end when the page restarts.
    return Sessions(web.secret or secrets.token_urlsafe(32), web.session_minutes * 60,
                    secure=web.https)
