"""Stripe adapter: an off-session, confirmed PaymentIntent per automatic top-up.

The stored card token is ``cus_<customer>/pm_<payment method>`` (the customer and the
saved PaymentMethod the card holder agreed to be charged off-session), or a bare
``pm_<payment method>``.  The blocking SDK runs in a worker thread; its own retries are
off so that a timeout surfaces as GatewayTimeout and the caller retries with the same
idempotency key, which Stripe honours.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import stripe

from policy.gateway import ChargeResult, GatewayTimeout, GatewayUnavailable
from prepaid.errors import InputError
from prepaid.money import MICROS_PER_UNIT, currency_decimals

log = logging.getLogger(__name__)


def minor_units(amount_micros: int, currency: str) -> int:
    """Micro-units to the currency's minor units (cents), refusing fractions of a cent."""
    scale = MICROS_PER_UNIT // 10 ** currency_decimals(currency)
    if amount_micros <= 0 or amount_micros % scale:
        raise InputError(f"amount of {amount_micros} micro-units is not a whole number of "
                         f"{currency} minor units")
    return int(amount_micros // scale)


def split_token(token: str) -> tuple[str, str]:
    """``cus_x/pm_y`` -> (customer, payment method); ``pm_y`` -> ("", payment method)."""
    customer, _, method = token.rpartition("/")
    if not method.startswith(("pm_", "card_", "src_")) or (customer and
                                                            not customer.startswith("cus_")):
        raise InputError(f"Stripe card token {token!r} must be cus_<id>/pm_<id> or pm_<id>")
    return customer, method


class StripeGateway:
    def __init__(self, api_key: str, *, api_base: str = "", timeout: float = 20.0) -> None:
        base: Any = {"api": api_base.rstrip("/")} if api_base else None
        self.client = stripe.StripeClient(
            api_key, base_addresses=base, max_network_retries=0,
            http_client=stripe.RequestsClient(timeout=timeout))

    async def charge(self, account: str, token: str, amount_micros: int, currency: str,
                     idempotency_key: str) -> ChargeResult:
        customer, method = split_token(token)
        params: dict[str, Any] = {
            "amount": minor_units(amount_micros, currency), "currency": currency.lower(),
            "payment_method": method, "off_session": True, "confirm": True,
            "description": f"prepaid top-up for account {account}",
            "metadata": {"account": account},
        }
        if customer:
            params["customer"] = customer
        return await asyncio.to_thread(self._create, params, idempotency_key)

    def _create(self, params: dict[str, Any], idempotency_key: str) -> ChargeResult:
        try:
            intent = self.client.v1.payment_intents.create(
                params=params,  # type: ignore[arg-type]
                options={"idempotency_key": idempotency_key})
        except stripe.CardError as exc:
            code = getattr(exc, "code", "") or ""
            intent_id = _intent_id(exc)
            reason = exc.user_message or str(exc)
            if code == "authentication_required":
                return ChargeResult("auth_required", intent_id, reason)
            return ChargeResult("declined", intent_id, reason)
        except stripe.APIConnectionError as exc:
            if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
                raise GatewayTimeout(f"Stripe did not answer in time: {exc}") from exc
            raise GatewayUnavailable(f"cannot reach Stripe: {exc}") from exc
        except (stripe.RateLimitError, stripe.APIError, stripe.AuthenticationError,
                stripe.PermissionError) as exc:
            raise GatewayUnavailable(f"Stripe refused the request: {exc}") from exc
        except stripe.InvalidRequestError as exc:
            # A missing customer or payment method will not fix itself: a permanent refusal.
            return ChargeResult("declined", "", exc.user_message or str(exc))
        status = intent.status
        if status == "succeeded":
            return ChargeResult("ok", intent.id)
        if status == "requires_action":
            return ChargeResult("auth_required", intent.id,
                                "the bank asks the card holder to authenticate this payment")
        if status == "requires_payment_method":
            return ChargeResult("declined", intent.id, "the card was declined")
        raise GatewayUnavailable(f"Stripe PaymentIntent {intent.id} is {status}; will retry")


def _intent_id(exc: stripe.StripeError) -> str:
    body = exc.json_body if isinstance(exc.json_body, dict) else {}
    err = body.get("error") if isinstance(body.get("error"), dict) else {}
    pi = err.get("payment_intent") if isinstance(err, dict) else None
    return str(pi.get("id", "")) if isinstance(pi, dict) else ""
