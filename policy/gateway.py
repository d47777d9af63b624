"""The payment gateway interface, its errors, and the local sandbox gateway (the Stripe one is
policy/stripe_gateway.py; policy/payments.py chooses between them).

A gateway charges a stored card token off-session.  Every call carries an idempotency
key; calling again with the same key must return the first outcome without charging twice.
Declines are outcomes (``ChargeResult.status``); not knowing the outcome is an exception
(``GatewayTimeout``/``GatewayUnavailable``) so the caller retries with the same key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from prepaid import keys
from prepaid.errors import PrepaidError
from prepaid.redis_client import REDIS_ERRORS, RedisClient

ChargeStatus = Literal["ok", "declined", "auth_required"]


class PaymentError(PrepaidError):
    """The payment provider could not be used."""


class GatewayTimeout(PaymentError, TimeoutError):
    """The provider did not answer in time; the outcome is unknown, retry with the same key."""


class GatewayUnavailable(PaymentError, ConnectionError):
    """The provider cannot be reached or failed; retry with the same key."""


@dataclass(frozen=True, slots=True)
class ChargeResult:
    status: ChargeStatus
    charge_id: str = ""
    reason: str = ""  # human-readable, for declines

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Gateway(Protocol):
    async def charge(self, account: str, token: str, amount_micros: int, currency: str,
                     idempotency_key: str) -> ChargeResult: ...


# Sandbox tokens, like a provider's test cards: the token chooses the outcome.
SANDBOX_TOKENS = {
    "tok_ok": ChargeResult("ok"),
    "tok_decline": ChargeResult("declined", reason="the card was declined"),
    "tok_insufficient": ChargeResult("declined", reason="the card has insufficient funds"),
    "tok_auth_required": ChargeResult(
        "auth_required", reason="the bank asks the card holder to authenticate this payment"),
}


class SandboxGateway:
    """A local gateway for tests and trials; charges are recorded in Redis by idempotency key.

    Tokens: ``tok_ok`` (and anything starting ``tok_ok``) succeeds, ``tok_decline`` and
    ``tok_insufficient`` are declined, ``tok_auth_required`` needs 3-D Secure,
    ``tok_timeout`` raises GatewayTimeout, ``tok_down`` raises GatewayUnavailable.
    """

    def __init__(self, client: RedisClient, prefix: str = "prepaid") -> None:
        self.redis = client
        self.prefix = prefix

    def charges_key(self, account: str) -> str:
        return keys.sandbox_charges(self.prefix, account)

    async def charge(self, account: str, token: str, amount_micros: int, currency: str,
                     idempotency_key: str) -> ChargeResult:
        if token == "tok_timeout":
            raise GatewayTimeout("sandbox gateway: timed out (token tok_timeout)")
        if token == "tok_down":
            raise GatewayUnavailable("sandbox gateway: unavailable (token tok_down)")
        outcome = SANDBOX_TOKENS.get(token)
        if outcome is None:
            outcome = ChargeResult("ok") if token.startswith("tok_ok") else ChargeResult(
                "declined", reason=f"unknown sandbox token {token!r}")
        record = json.dumps({"status": outcome.status, "reason": outcome.reason,
                             "amount": amount_micros, "currency": currency, "token": token})
        key = self.charges_key(account)
        try:
            await self.redis.hsetnx(key, idempotency_key, record)  # the first outcome wins
            first = await self.redis.hget(key, idempotency_key)
        except REDIS_ERRORS as exc:
            raise GatewayUnavailable(f"sandbox gateway: Redis unavailable: {exc}") from exc
        data = json.loads(first or record)
        return ChargeResult(data["status"], f"sb_{idempotency_key}", data["reason"])

    async def charges(self, account: str) -> dict[str, dict[str, object]]:
        """Every charge made for ``account``, by idempotency key (for tests and the bench)."""
        raw: Any = await self.redis.hgetall(self.charges_key(account))
        return {k.decode(): json.loads(v) for k, v in raw.items()}

