"""Headers on every response of the web page, whatever produced it (a page, a redirect, a
404, a 500): the Content-Security-Policy, HSTS over HTTPS, and the usual hardening.

It wraps the whole ASGI app, outside Starlette's own error handling, so even its error
pages carry them.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HSTS = "max-age=31536000; includeSubDomains"


def csp(form_targets: Iterable[str] = ()) -> str:
    """No script at all, styles only from this server, forms only to this server (and the
    payment provider's hosted page, where a form's redirect goes)."""
    targets = " ".join(["'self'", *form_targets])
    return ("default-src 'none'; style-src 'self'; img-src 'self'; "
            f"form-action {targets}; frame-ancestors 'none'; base-uri 'none'")


class SecureHeaders:
    def __init__(self, app: ASGIApp, *, https: bool, form_targets: Iterable[str] = ()) -> None:
        self.app = app
        headers = [("content-security-policy", csp(form_targets)),
                   ("x-content-type-options", "nosniff"), ("x-frame-options", "DENY"),
                   ("referrer-policy", "same-origin"), ("cache-control", "no-store")]
        if https:
            headers.append(("strict-transport-security", HSTS))
        self.headers = [(k.encode(), v.encode()) for k, v in headers]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k for k, v in self.headers}
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message["headers"] = [*kept, *self.headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)
