"""Hosted payment pages: Stripe Checkout, or the sandbox gateway's own page on this server.

Setup mode stores a card, payment mode adds credit.  The card number is typed into the
provider's page, never into ours: what comes back is the provider's session, and from it
a token (``cus_.../pm_...`` for Stripe, ``tok_...`` for the sandbox), the brand, the last
four digits and the expiry.  The sandbox page takes only its own test card numbers,
turns one into its token at once and keeps nothing else of it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import stripe

from policy.gateway import GatewayUnavailable
from policy.stripe_gateway import minor_units
from prepaid import keys
from prepaid.errors import InputError
from prepaid.money import MICROS_PER_UNIT, currency_decimals
from prepaid.redis_client import RedisClient, text

Mode = Literal["setup", "payment"]
METADATA_ACCOUNT = "prepaid_account"  # the Checkout session's metadata: whose it is


@dataclass(frozen=True, slots=True)
class Started:
    id: str
    url: str


@dataclass(frozen=True, slots=True)
class Completed:
    """A finished Checkout session, as the provider reports it."""

    id: str
    mode: Mode
    account: str
    paid: bool
    amount: int = 0  # micro-units (payment mode)
    currency: str = ""
    setup_ref: str = ""  # the SetupIntent (Stripe) to read the card from
    customer: str = ""


@dataclass(frozen=True, slots=True)
class CardDetails:
    token: str
    brand: str
    last4: str
    exp: str  # MM/YY


class Checkout(Protocol):
    name: str

    async def start_setup(self, account: str, customer: str, success_url: str,
                          cancel_url: str) -> Started: ...

    async def start_payment(self, account: str, amount: int, currency: str, success_url: str,
                            cancel_url: str) -> Started: ...

    async def card(self, done: Completed) -> CardDetails: ...

    async def find(self, session_id: str) -> Completed | None: ...

    async def completed_since(self, since: float) -> list[Completed]: ...


def to_micros(minor: int, currency: str) -> int:
    return int(minor) * int(MICROS_PER_UNIT // 10 ** currency_decimals(currency))


# -- the sandbox ---------------------------------------------------------------------------

# The sandbox's test cards (as a provider's test mode has): the number chooses the token.
TEST_CARDS = {
    "4242424242424242": ("tok_ok", "visa"),
    "5555555555554444": ("tok_ok_mastercard", "mastercard"),
    "4000000000000002": ("tok_decline", "visa"),
    "4000000000009995": ("tok_insufficient", "visa"),
    "4000002500003155": ("tok_auth_required", "visa"),
}


def sandbox_card(number: str) -> tuple[str, str, str]:
    """(token, brand, last4) of a sandbox test card number; InputError for anything else,
    so no real card number is ever taken (and none is repeated in the message)."""
    digits = number.replace(" ", "").replace("-", "")
    found = TEST_CARDS.get(digits)
    if found is None:
        raise InputError("this is the sandbox payment page: use one of its test card "
                         "numbers, such as 4242 4242 4242 4242")
    return found[0], found[1], digits[-4:]


class SandboxCheckout:
    """Checkout sessions of the sandbox, in Redis; its page is served by the web app at
    ``/sandbox/checkout/<id>``."""

    name = "sandbox"

    def __init__(self, client: RedisClient, prefix: str = "prepaid") -> None:
        self.redis, self.prefix = client, prefix

    async def _start(self, mode: Mode, account: str, success_url: str, cancel_url: str,
                     amount: int = 0, currency: str = "") -> Started:
        sid = f"cs_sandbox_{secrets.token_urlsafe(18)}"
        now = time.time()
        await self.redis.hset(keys.sandbox_checkout(self.prefix, sid), mapping={
            "id": sid, "mode": mode, "account": account, "amount": str(amount),
            "currency": currency, "status": "open", "created": f"{now:.3f}",
            "success_url": success_url.replace("{CHECKOUT_SESSION_ID}", sid),
            "cancel_url": cancel_url})
        await self.redis.zadd(keys.sandbox_checkouts(self.prefix), {sid: now})
        return Started(sid, f"/sandbox/checkout/{sid}")

    async def start_setup(self, account: str, customer: str, success_url: str,
                          cancel_url: str) -> Started:
        return await self._start("setup", account, success_url, cancel_url)

    async def start_payment(self, account: str, amount: int, currency: str, success_url: str,
                            cancel_url: str) -> Started:
        return await self._start("payment", account, success_url, cancel_url, amount, currency)

    async def record(self, session_id: str) -> dict[str, str]:
        """The session's fields; {} if there is none."""
        if not session_id.startswith("cs_sandbox_") or len(session_id) > 80:
            return {}
        raw: Any = await self.redis.hgetall(keys.sandbox_checkout(self.prefix, session_id))
        return {text(k): text(v) for k, v in raw.items()}

    async def complete(self, session_id: str, token: str, brand: str, last4: str,
                       exp: str) -> Completed | None:
        """The page's "Pay"/"Save card": the card's token is kept on the session, which is
        complete from then on (one HSET: a second completion changes nothing)."""
        if (await self.record(session_id)).get("status") == "open":
            await self.redis.hset(keys.sandbox_checkout(self.prefix, session_id), mapping={
                "token": token, "brand": brand, "last4": last4, "exp": exp,
                "status": "complete"})
        return await self.find(session_id)

    async def card(self, done: Completed) -> CardDetails:
        rec = await self.record(done.id)
        return CardDetails(rec.get("token", ""), rec.get("brand", ""), rec.get("last4", ""),
                           rec.get("exp", ""))

    async def find(self, session_id: str) -> Completed | None:
        rec = await self.record(session_id)
        if rec.get("status") != "complete":
            return None
        mode: Mode = "setup" if rec["mode"] == "setup" else "payment"
        return Completed(rec["id"], mode, rec["account"], True, int(rec["amount"]),
                         rec["currency"])

    async def completed_since(self, since: float) -> list[Completed]:
        ids = await self.redis.zrangebyscore(keys.sandbox_checkouts(self.prefix), since, "+inf")
        found = [await self.find(text(i)) for i in ids]
        return [c for c in found if c is not None]


# -- Stripe ----------------------------------------------------------------------------------

def plain(obj: Any) -> Any:
    """A Stripe object as plain dicts and lists (the SDK's objects are not dicts)."""
    return obj.to_dict() if isinstance(obj, stripe.StripeObject) else obj


def completed_from_stripe(raw: Any) -> Completed | None:
    """A Checkout Session object (a webhook's ``data.object`` or an API reply) as ours;
    None when it is not one of this page's sessions."""
    obj = plain(raw)
    meta = obj.get("metadata") or {}
    account = meta.get(METADATA_ACCOUNT) if hasattr(meta, "get") else None
    if not account or obj.get("status") != "complete":
        return None
    mode = obj.get("mode")
    if mode == "setup":
        setup = obj.get("setup_intent") or ""
        setup_id = setup if isinstance(setup, str) else str(setup.get("id", ""))
        return Completed(str(obj["id"]), "setup", str(account), True, setup_ref=setup_id,
                         customer=str(obj.get("customer") or ""))
    if mode != "payment":
        return None
    currency = str(obj.get("currency") or "").upper()
    amount = int(obj.get("amount_total") or 0)
    return Completed(str(obj["id"]), "payment", str(account),
                     obj.get("payment_status") == "paid",
                     to_micros(amount, currency) if currency else 0, currency,
                     customer=str(obj.get("customer") or ""))


class StripeCheckout:
    """Stripe Checkout through the official SDK (blocking: in a worker thread)."""

    name = "stripe"

    def __init__(self, api_key: str, *, api_base: str = "", timeout: float = 20.0) -> None:
        base: Any = {"api": api_base.rstrip("/")} if api_base else None
        self.client = stripe.StripeClient(
            api_key, base_addresses=base, max_network_retries=2,
            http_client=stripe.RequestsClient(timeout=timeout))

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except stripe.StripeError as exc:
            raise GatewayUnavailable(f"Stripe refused or failed: {exc}") from exc

    async def start_setup(self, account: str, customer: str, success_url: str,
                          cancel_url: str) -> Started:
        v1 = self.client.v1
        if not customer:
            made = await self._call(v1.customers.create, params={
                "metadata": {METADATA_ACCOUNT: account},
                "description": f"prepaid account {account}"})
            customer = made.id
        session = await self._call(v1.checkout.sessions.create, params={
            "mode": "setup", "customer": customer, "payment_method_types": ["card"],
            "client_reference_id": account, "metadata": {METADATA_ACCOUNT: account},
            "success_url": success_url, "cancel_url": cancel_url})
        return Started(session.id, session.url)

    async def start_payment(self, account: str, amount: int, currency: str, success_url: str,
                            cancel_url: str) -> Started:
        session = await self._call(self.client.v1.checkout.sessions.create, params={
            "mode": "payment", "client_reference_id": account,
            "metadata": {METADATA_ACCOUNT: account},
            "payment_intent_data": {"metadata": {METADATA_ACCOUNT: account}},
            "line_items": [{"quantity": 1, "price_data": {
                "currency": currency.lower(), "unit_amount": minor_units(amount, currency),
                "product_data": {"name": f"Prepaid call credit, account {account}"}}}],
            "success_url": success_url, "cancel_url": cancel_url})
        return Started(session.id, session.url)

    async def card(self, done: Completed) -> CardDetails:
        intent = plain(await self._call(self.client.v1.setup_intents.retrieve, done.setup_ref,
                                        params={"expand": ["payment_method"]}))
        method = intent.get("payment_method")
        card = method.get("card") if method is not None else None
        if not card:
            raise GatewayUnavailable(f"Stripe SetupIntent {done.setup_ref} has no card")
        customer = str(intent.get("customer") or done.customer)
        token = f"{customer}/{method['id']}" if customer else str(method["id"])
        exp = f"{int(card['exp_month']):02d}/{int(card['exp_year']) % 100:02d}"
        return CardDetails(token, str(card.get("brand") or "other"), str(card["last4"]), exp)

    async def find(self, session_id: str) -> Completed | None:
        if not session_id.startswith("cs_") or len(session_id) > 200:
            return None
        obj = await self._call(self.client.v1.checkout.sessions.retrieve, session_id)
        return completed_from_stripe(obj)

    async def completed_since(self, since: float) -> list[Completed]:
        def listing() -> list[Any]:
            page = self.client.v1.checkout.sessions.list(params={
                "status": "complete", "created": {"gte": int(since)}, "limit": 100})
            return list(page.auto_paging_iter())
        found = [completed_from_stripe(s) for s in await self._call(listing)]
        return [c for c in found if c is not None]
