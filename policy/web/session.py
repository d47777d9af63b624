"""Signed session cookies, CSRF tokens and the log-in rate limit of the web page.

The session is a cookie signed with ``[web] secret`` (itsdangerous, HMAC-SHA1 over the
value and a time stamp): it names the account and carries the CSRF token every form
posts back.  Nothing about it is kept on the server; it expires after
``[web] session_minutes``.  A visitor who is not logged in gets one too (account ``""``),
so the log-in form has its CSRF token as well.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from collections import deque
from dataclasses import dataclass, replace

from itsdangerous import BadSignature, URLSafeTimedSerializer

COOKIE = "prepaid_session"
CSRF_FIELD = "csrf"


@dataclass(frozen=True, slots=True)
class WebSession:
    account: str  # "" before log-in (and for the admin)
    csrf: str
    role: str = "customer"  # or "admin" (policy/web/admin.py), which has no account

    @property
    def logged_in(self) -> bool:
        return bool(self.account)

    def as_account(self, account: str) -> WebSession:
        """The session after log-in: a new CSRF token too (no fixation of the old one)."""
        return replace(self, account=account, csrf=secrets.token_urlsafe(24), role="customer")

    def as_admin(self) -> WebSession:
        return replace(self, account="", csrf=secrets.token_urlsafe(24), role="admin")


def new_session() -> WebSession:
    return WebSession("", secrets.token_urlsafe(24))


class Sessions:
    def __init__(self, secret: str, max_age_seconds: int, secure: bool) -> None:
        self.serializer = URLSafeTimedSerializer(secret, salt="prepaid-web-session")
        self.max_age = max_age_seconds
        self.secure = secure

    def dump(self, session: WebSession) -> str:
        return self.serializer.dumps(json.dumps([session.account, session.csrf, session.role]))

    def load(self, cookie: str | None) -> WebSession | None:
        """The session the cookie holds; None if there is none, or it is forged or old."""
        if not cookie:
            return None
        try:
            raw = self.serializer.loads(cookie, max_age=self.max_age)
            account, csrf, role = json.loads(raw)
        except (BadSignature, ValueError, TypeError):
            return None
        if not all(isinstance(x, str) for x in (account, csrf, role)) or not csrf or (
                role not in ("customer", "admin")) or (role == "admin" and account):
            return None
        return WebSession(account, csrf, role)

    def cookie_header(self, session: WebSession | None) -> str:
        """The Set-Cookie value: HttpOnly, SameSite=Lax (Checkout's return is a top-level
        GET from the provider's site), Secure over HTTPS; None clears it."""
        value = self.dump(session) if session is not None else ""
        age = self.max_age if session is not None else 0
        parts = [f"{COOKIE}={value}", "Path=/", f"Max-Age={age}", "HttpOnly", "SameSite=Lax"]
        if self.secure:
            parts.append("Secure")
        return "; ".join(parts)


def csrf_ok(session: WebSession | None, token: object) -> bool:
    return (session is not None and isinstance(token, str)
            and hmac.compare_digest(session.csrf.encode(), token.encode()))


class RateLimit:
    """At most ``limit`` events per ``window`` seconds per key (a client address), in this
    process: the PIN lock-out in Redis (prepaid/pins.py) is the limit that counts across
    processes and the phone; this one stops a single client from trying many accounts."""

    def __init__(self, limit: int, window: float, max_keys: int = 10_000) -> None:
        self.limit, self.window, self.max_keys = limit, window, max_keys
        self._seen: dict[str, deque[float]] = {}

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if len(self._seen) >= self.max_keys:
            self._forget(now)
        times = self._seen.setdefault(key, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= self.limit:
            return False
        times.append(now)
        return True

    def _forget(self, now: float) -> None:
        for key in [k for k, t in self._seen.items() if not t or t[-1] <= now - self.window]:
            del self._seen[key]
