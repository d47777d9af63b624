"""The Stripe adapter with the real SDK against a local HTTP server: no network."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import pytest

from policy.gateway import GatewayTimeout, GatewayUnavailable
from policy.payments import make_gateway
from policy.stripe_gateway import StripeGateway, minor_units, split_token
from prepaid.config import parse
from prepaid.errors import ConfigError, InputError
from testbed.servers import free_port


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    form: dict[str, list[str]]


@dataclass
class FakeStripe:
    """Answers POST /v1/payment_intents with the reply the test chose."""

    port: int
    seen: list[Seen] = field(default_factory=list)
    reply: tuple[int, dict[str, Any]] = (200, {})
    hold: threading.Event | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    state = FakeStripe(free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("Content-Length", "0"))
            form = parse_qs(self.rfile.read(length).decode(), keep_blank_values=True)
            state.seen.append(Seen("POST", self.path, dict(self.headers.items()), form))
            if state.hold is not None:
                state.hold.wait(5)  # answer only when the test lets go (after its timeout)
            status, payload = state.reply
            data = json.dumps(payload).encode()
            # After a client time-out the peer is gone: nothing to answer.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", state.port), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    if state.hold is not None:
        state.hold.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


def intent(status: str, pid: str = "pi_123") -> dict[str, Any]:
    return {"id": pid, "object": "payment_intent", "status": status, "amount": 2000,
            "currency": "eur"}


def card_error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"type": "card_error", "code": code, "message": message,
                      "decline_code": "generic_decline" if code == "card_declined" else None,
                      "payment_intent": intent("requires_payment_method", "pi_declined")}}


async def test_a_charge_sends_an_off_session_confirmed_payment_intent(
        fake_stripe: FakeStripe) -> None:
    fake_stripe.reply = (200, intent("succeeded"))
    gw = StripeGateway("sk_test_abc", api_base=fake_stripe.base, timeout=5)
    result = await gw.charge("1001", "cus_9/pm_7", 20_000_000, "EUR", "autotopup:1-0")
    assert (result.status, result.charge_id) == ("ok", "pi_123")
    [req] = fake_stripe.seen
    assert (req.method, req.path) == ("POST", "/v1/payment_intents")
    assert req.headers["Idempotency-Key"] == "autotopup:1-0"
    assert req.headers["Authorization"] == "Bearer sk_test_abc"
    form = {k: v[0] for k, v in req.form.items()}
    assert {k: form[k] for k in ("amount", "currency", "customer", "payment_method",
                                 "off_session", "confirm", "metadata[account]")} == {
        "amount": "2000", "currency": "eur", "customer": "cus_9", "payment_method": "pm_7",
        "off_session": "true", "confirm": "true", "metadata[account]": "1001"}


async def test_a_bare_payment_method_and_zero_decimal_currency(fake_stripe: FakeStripe) -> None:
    fake_stripe.reply = (200, intent("succeeded"))
    gw = StripeGateway("sk_test_abc", api_base=fake_stripe.base, timeout=5)
    await gw.charge("1001", "pm_7", 500_000_000, "JPY", "k")
    form = fake_stripe.seen[0].form
    assert form["amount"] == ["500"] and "customer" not in form


async def test_a_declined_card_is_an_outcome(fake_stripe: FakeStripe) -> None:
    fake_stripe.reply = (402, card_error("card_declined", "Your card was declined."))
    gw = StripeGateway("sk_test_abc", api_base=fake_stripe.base, timeout=5)
    result = await gw.charge("1001", "cus_9/pm_7", 20_000_000, "EUR", "k")
    assert (result.status, result.charge_id, result.reason) == (
        "declined", "pi_declined", "Your card was declined.")


async def test_authentication_required_is_an_outcome(fake_stripe: FakeStripe) -> None:
    fake_stripe.reply = (402, card_error("authentication_required",
                                         "This payment requires authentication."))
    gw = StripeGateway("sk_test_abc", api_base=fake_stripe.base, timeout=5)
    result = await gw.charge("1001", "cus_9/pm_7", 20_000_000, "EUR", "k")
    assert result.status == "auth_required"


async def test_requires_action_is_authentication(fake_stripe: FakeStripe) -> None:
    fake_stripe.reply = (200, intent("requires_action"))
    gw = StripeGateway("sk_test_abc", api_base=fake_stripe.base, timeout=5)
    assert (await gw.charge("1001", "pm_7", 1_000_000, "EUR", "k")).status == "auth_required"


async def test_a_server_error_is_retryable(fake_stripe: FakeStripe) -> None:
    fake_stripe.reply = (500, {"error": {"type": "api_error", "message": "boom"}})
    gw = StripeGateway("sk_test_abc", api_base=fake_stripe.base, timeout=5)
    with pytest.raises(GatewayUnavailable, match="Stripe refused the request"):
        await gw.charge("1001", "pm_7", 1_000_000, "EUR", "k")
    assert len(fake_stripe.seen) == 1  # the SDK's own retries are off: we retry with the key


async def test_no_answer_in_time_is_a_timeout(fake_stripe: FakeStripe) -> None:
    fake_stripe.hold = threading.Event()
    gw = StripeGateway("sk_test_abc", api_base=fake_stripe.base, timeout=0.3)
    with pytest.raises(GatewayTimeout):
        await gw.charge("1001", "pm_7", 1_000_000, "EUR", "k")
    fake_stripe.hold.set()


async def test_nobody_listening_is_unavailable() -> None:
    gw = StripeGateway("sk_test_abc", api_base=f"http://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(GatewayUnavailable, match="cannot reach Stripe"):
        await gw.charge("1001", "pm_7", 1_000_000, "EUR", "k")


def test_token_and_amount_checks() -> None:
    assert split_token("cus_1/pm_2") == ("cus_1", "pm_2")
    with pytest.raises(InputError, match="must be cus_<id>/pm_<id> or pm_<id>"):
        split_token("tok_ok")
    assert minor_units(12_340_000, "EUR") == 1234
    with pytest.raises(InputError, match="not a whole number of EUR minor units"):
        minor_units(12_345_000, "EUR")


def test_the_gateway_follows_the_settings() -> None:
    with pytest.raises(ConfigError, match="no stripe_api_key"):
        make_gateway(parse({"payments": {"gateway": "stripe"}}, env={}), None)  # type: ignore
    gw = make_gateway(parse({"payments": {"gateway": "stripe"}}, env={"STRIPE_API_KEY": "sk"}),
                      None)  # type: ignore[arg-type]
    assert isinstance(gw, StripeGateway)
