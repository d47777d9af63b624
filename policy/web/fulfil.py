"""What a finished Checkout session does: store the card (setup) or credit the account
(payment), exactly once whichever way the news comes: the webhook (once, twice, out of
order), the customer's return to the page, or the reconciliation pass.

Payment: the ledger credit's idempotency key is ``checkout:<provider session id>``, so a
second delivery changes nothing; the receipt's mail id is ``checkout:<account>:<id>``,
queued once.  Setup: the card is stored, then the session is marked handled in the
account's ``checkout-done`` hash, so a webhook replayed after the card was removed does
not bring it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import stripe

from policy.commands import set_card
from policy.gateway import PaymentError
from policy.mailer import MailQueue, Templates, compose
from policy.web.checkout import Checkout, Completed, completed_from_stripe
from policy.worker import mail_context
from prepaid import keys
from prepaid.errors import PrepaidError, UnknownAccount
from prepaid.money import format_amount
from prepaid.store import Store

log = logging.getLogger(__name__)

HANDLED_EVENTS = ("checkout.session.completed", "checkout.session.async_payment_succeeded")
RECONCILE_DAYS = 3  # how far back the reconciliation pass looks


@dataclass(frozen=True, slots=True)
class Outcome:
    what: str  # credited, duplicate, card-stored, already, unpaid, refused
    detail: str = ""


def _done_key(store: Store, account: str) -> str:
    return keys.account_part(store.settings.redis.key_prefix, account, "checkout-done")


async def fulfil(store: Store, checkout: Checkout, done: Completed) -> Outcome:
    try:
        acct = await store.ledger.get(done.account)
    except UnknownAccount:
        log.error("checkout session %s names account %r, which does not exist", done.id,
                  done.account)
        return Outcome("refused", "unknown account")
    if done.mode == "setup":
        return await _store_card(store, checkout, done)
    if not done.paid:
        return Outcome("unpaid")
    if done.currency != acct.currency or done.amount <= 0:
        log.error("checkout session %s paid %s %s, but account %s is in %s: not credited",
                  done.id, done.amount, done.currency, acct.id, acct.currency)
        return Outcome("refused", "currency")
    change = await store.ledger.credit(acct.id, done.amount, key=f"checkout:{done.id}",
                                       ref=done.id)
    if acct.email:  # queued once by mail id, also when this delivery is a duplicate
        settings, mail_id = store.settings, f"checkout:{acct.id}:{done.id}"
        ctx = mail_context(acct, amount=format_amount(done.amount, acct.currency),
                           balance=format_amount(change.balance, acct.currency),
                           reference=done.id)
        msg = compose(Templates(settings.smtp.templates), settings.smtp.sender, acct.email,
                      "manual_receipt", ctx, mail_id)
        try:
            await MailQueue(store.redis, settings.redis.key_prefix).enqueue(mail_id, msg)
        except Exception as exc:  # noqa: BLE001 - the credit stands whatever the mail does
            log.error("checkout %s credited to %s, but its receipt was not queued: %s",
                      done.id, acct.id, exc)
    if change.duplicate:
        return Outcome("duplicate")
    log.info("checkout %s credited %s to %s", done.id,
             format_amount(done.amount, acct.currency), acct.id)
    return Outcome("credited")


async def _store_card(store: Store, checkout: Checkout, done: Completed) -> Outcome:
    done_key = _done_key(store, done.account)
    if await store.redis.hexists(done_key, done.id):
        return Outcome("already")
    card = await checkout.card(done)
    try:
        await set_card(store, done.account, token=card.token, brand=card.brand,
                       last4=card.last4, exp=card.exp)
    except PrepaidError as exc:
        log.error("checkout session %s: the card of account %s was not stored: %s", done.id,
                  done.account, exc)
        return Outcome("refused", str(exc))
    await store.redis.hset(done_key, done.id, f"{time.time():.3f}")
    log.info("checkout %s stored a %s card for %s", done.id, card.brand, done.account)
    return Outcome("card-stored")


def verify_event(payload: bytes, signature: str, secret: str) -> stripe.Event:
    """The event if Stripe signed it with ``secret``; ValueError if not (bad signature, too
    old a time stamp, not JSON)."""
    try:
        event: stripe.Event = stripe.Webhook.construct_event(payload, signature, secret)
    except stripe.SignatureVerificationError as exc:
        raise ValueError(f"bad webhook signature: {exc.user_message or exc}") from None
    return event


async def on_event(store: Store, checkout: Checkout, event: stripe.Event) -> Outcome:
    if event.type not in HANDLED_EVENTS:
        return Outcome("ignored", event.type)
    done = completed_from_stripe(event.data.object)
    if done is None:
        return Outcome("ignored", "not a session of this page")
    return await fulfil(store, checkout, done)


async def reconcile(store: Store, checkout: Checkout, now: float | None = None) -> int:
    """Fulfil every session the provider reports complete in the last RECONCILE_DAYS (those
    seen before change nothing); returns how many were new."""
    since = (time.time() if now is None else now) - RECONCILE_DAYS * 86400
    new = 0
    for done in await checkout.completed_since(since):
        outcome = await fulfil(store, checkout, done)
        new += outcome.what in ("credited", "card-stored")
    return new


async def reconcile_forever(store: Store, checkout: Checkout, stop: asyncio.Event,
                            seconds: float) -> None:
    failing = False
    while not stop.is_set():
        try:
            found = await reconcile(store, checkout)
            if found:
                log.warning("reconciliation: %s checkout session(s) had not been seen by a "
                            "webhook; fulfilled now", found)
            if failing:
                log.info("reconciliation works again")
            failing = False
        except (PaymentError, PrepaidError) as exc:
            if not failing:  # an outage is logged once
                log.error("reconciliation failed: %s", exc)
            failing = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
