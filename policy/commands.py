"""CLI commands of the policy engine (``prepaid policy``, ``prepaid card``) and the manual
top-up the lead's ``prepaid topup`` calls.  The work is in plain async functions so the
tests drive them directly; the click wrappers only parse, print and turn errors into one line.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import date
from typing import Any, TypeVar

import click

from policy.cards import validate_card
from policy.mailer import MailQueue, Templates, compose
from policy.stripe_gateway import split_token
from policy.worker import mail_context
from prepaid import config as config_mod
from prepaid.config import ACTIONS, Settings
from prepaid.errors import InputError, PrepaidError
from prepaid.inputs import check_email, check_reference
from prepaid.ledger import Account, Change, account_json, check_account_id
from prepaid.money import currency_decimals, format_amount, parse_amount
from prepaid.store import Store, open_store

T = TypeVar("T")
log = logging.getLogger(__name__)


# -- the work ------------------------------------------------------------------
async def set_policy(store: Store, account: str, *, threshold: str | None = None,
                     action: str | None = None, amount: str | None = None,
                     email: str | None = None, enabled: bool | None = None) -> Account:
    """Change an account's low-balance policy; amounts are text in currency units."""
    acct = await store.ledger.get(check_account_id(account))
    decimals = currency_decimals(acct.currency)
    new_threshold = acct.threshold if threshold is None else parse_amount(
        threshold, decimals=decimals, what="--threshold", allow_zero=True)
    new_amount = acct.topup_amount if amount is None else parse_amount(
        amount, decimals=decimals, what="--amount")
    new_action = acct.action if action is None else action
    new_email = acct.email if email is None else email
    if new_action not in ACTIONS:
        raise InputError(f"--action {new_action!r} must be one of {', '.join(ACTIONS)}")
    check_email(new_email)
    if enabled is None:
        enabled = (new_action != "none") if action is not None else acct.policy_enabled
    if new_action != "none" and enabled:
        if new_threshold <= 0:
            raise InputError(f"account {account}: give a --threshold above zero for action "
                             f"{new_action} (for example 5)")
        if new_action == "email" and not new_email:
            raise InputError(f"account {account}: action email needs an e-mail address; "
                             "give --email")
        if new_action == "topup":
            if not acct.has_card:
                raise InputError(f"account {account} has no stored card; store one with "
                                 f"'prepaid card set {account} --token ...' before choosing "
                                 "--action topup")
            if new_amount <= 0:
                raise InputError(f"account {account}: action topup needs --amount "
                                 "(for example 20)")
            cap = store.settings.policy.max_topup
            if new_amount > cap:
                raise InputError(f"--amount {format_amount(new_amount, acct.currency)} is above "
                                 f"the maximum top-up of {format_amount(cap, acct.currency)} "
                                 "([policy] max_topup)")
    return await store.ledger.update(
        account, threshold=str(new_threshold), action=new_action, topup_amount=str(new_amount),
        email=new_email, policy_enabled="1" if enabled else "0")


async def set_card(store: Store, account: str, *, token: str, brand: str, last4: str,
                   exp: str, today: date | None = None) -> Account:
    card = validate_card(token, brand, last4, exp, today or date.today())
    gateway = store.settings.payments.gateway
    if gateway == "stripe":
        split_token(card.token)
    elif not card.token.startswith("tok_"):  # it could never be charged: refuse it now
        raise InputError(f"card token {card.token!r} is not a sandbox token (tok_ok, "
                         "tok_decline, ...) and [payments] gateway is \"sandbox\"; set "
                         "gateway = \"stripe\" before storing real tokens")
    await store.ledger.get(check_account_id(account))
    return await store.ledger.update(account, card_token=card.token, card_brand=card.brand,
                                     card_last4=card.last4, card_exp=card.exp, declines="0",
                                     decline_until="0")


async def remove_card(store: Store, account: str) -> tuple[Account, bool]:
    """Forget the card; an account set to top up automatically falls back to e-mail."""
    acct = await store.ledger.get(check_account_id(account))
    fields = {"card_token": "", "card_brand": "", "card_last4": "", "card_exp": ""}
    switched = acct.action == "topup"
    if switched:
        fields["action"] = "email"
    return await store.ledger.update(account, **fields), switched


def presets(settings: Settings) -> tuple[int, ...]:
    """The manual top-up amounts offered to customers, in micro-units."""
    return settings.policy.presets


async def manual_topup(store: Store, account: str, amount: int, reference: str,
                       override: bool = False, problems: list[str] | None = None) -> Change:
    """Credit a manual top-up (key ``topup:<reference>``) and queue its receipt e-mail.

    Refuses an amount above ``[policy] max_topup`` unless ``override``.  The receipt goes
    through the mail queue, so an SMTP outage never loses it and never delays the credit.
    Once the money is credited nothing raises: a receipt that cannot be queued is logged
    and described in ``problems``, so the admin never retries (and credits twice).
    """
    check_reference(reference)
    acct = await store.ledger.get(check_account_id(account))
    cap = store.settings.policy.max_topup
    if amount > cap and not override:
        raise InputError(f"top-up of {format_amount(amount, acct.currency)} is above the maximum "
                         f"of {format_amount(cap, acct.currency)} ([policy] max_topup); "
                         "use --override to allow it")
    change = await store.ledger.credit(account, amount, key=f"topup:{reference}", ref=reference)
    if acct.email:  # queued again after a crash is harmless: the mail id is the same
        try:
            await _queue_receipt(store, acct, amount, change, reference)
        except Exception as exc:  # noqa: BLE001 - the credit stands whatever the mail does
            log.error("top-up %s of %s credited, but its receipt to %r was not queued: %s",
                      reference, account, acct.email, exc)
            if problems is not None:
                problems.append(f"receipt to {acct.email!r} not queued: {exc}")
    return change


async def _queue_receipt(store: Store, acct: Account, amount: int, change: Change,
                         reference: str) -> None:
    settings, mail_id = store.settings, f"manual:{acct.id}:{reference}"
    ctx = mail_context(acct, amount=format_amount(amount, acct.currency),
                       balance=format_amount(change.balance, acct.currency), reference=reference)
    msg = compose(Templates(settings.smtp.templates), settings.smtp.sender, acct.email,
                  "manual_receipt", ctx, mail_id)
    await MailQueue(store.redis, settings.redis.key_prefix).enqueue(mail_id, msg)


# -- click -------------------------------------------------------------------------
def _settings() -> Settings:
    """The lead's CLI context (``ctx.obj.settings``) if there is one, else the config file."""
    obj: Any = click.get_current_context().find_root().obj
    settings = getattr(obj, "settings", None)
    if isinstance(settings, Settings):
        return settings
    if isinstance(obj, Settings):
        return obj
    return config_mod.load()


def _run(body: Callable[[Store], Awaitable[T]]) -> T:
    async def go() -> T:
        store = await open_store(_settings())
        try:
            return await body(store)
        finally:
            await store.close()
    try:
        return asyncio.run(go())
    except PrepaidError as exc:
        raise click.ClickException(str(exc)) from None


def describe(acct: Account) -> str:
    cur = acct.currency
    state = "on" if acct.policy_enabled else "off"
    text = (f"{acct.id}: below {format_amount(acct.threshold, cur)} -> {acct.action} ({state})")
    if acct.action == "topup":
        text += f", top-up {format_amount(acct.topup_amount, cur)}"
    text += f", e-mail {acct.email or 'none'}"
    text += (f", card {acct.card_brand} ****{acct.card_last4} exp {acct.card_exp}"
             if acct.has_card else ", no card")
    return text


@click.command("policy")
@click.argument("account_id")
@click.option("--threshold", default=None, help="Act when the balance falls below this (e.g. 5).")
@click.option("--action", type=click.Choice(ACTIONS), default=None,
              help="What to do then: nothing, e-mail a warning, or top up from the card.")
@click.option("--amount", default=None, help="Automatic top-up amount (e.g. 20).")
@click.option("--email", default=None, help="Where warnings and receipts go.")
@click.option("--on/--off", "enabled", default=None, help="Switch the policy on or off.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def policy_cmd(account_id: str, threshold: str | None, action: str | None, amount: str | None,
               email: str | None, enabled: bool | None, as_json: bool) -> None:
    """Show or set ACCOUNT_ID's low-balance policy."""
    acct = _run(lambda st: set_policy(st, account_id, threshold=threshold, action=action,
                                      amount=amount, email=email, enabled=enabled))
    if as_json:
        _emit_json(acct, "policy")
        return
    click.echo(describe(acct))


def _emit_json(acct: Account, part: str) -> None:
    data = account_json(acct)
    click.echo(json.dumps({"account": acct.id, "email": acct.email, part: data[part]},
                          indent=2, sort_keys=True))


@click.group("card")
def card_group() -> None:
    """The stored card for automatic top-ups (a payment provider token, never a number)."""


@card_group.command("set")
@click.argument("account_id")
@click.option("--token", required=True,
              help="Payment provider token: for Stripe cus_<id>/pm_<id>; sandbox tok_ok etc.")
@click.option("--brand", required=True, help="visa, mastercard, amex, ...")
@click.option("--last4", required=True, help="The last four digits, for receipts.")
@click.option("--exp", required=True, help="Expiry MM/YY.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def card_set(account_id: str, token: str, brand: str, last4: str, exp: str,
             as_json: bool) -> None:
    """Store ACCOUNT_ID's card token for automatic top-ups."""
    acct = _run(lambda st: set_card(st, account_id, token=token, brand=brand, last4=last4,
                                    exp=exp))
    if as_json:
        _emit_json(acct, "card")
        return
    click.echo(f"{acct.id}: card {acct.card_brand} ****{acct.card_last4} exp {acct.card_exp} "
               "stored")


@card_group.command("show")
@click.argument("account_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def card_show(account_id: str, as_json: bool) -> None:
    """Show ACCOUNT_ID's stored card (never the token in full)."""
    acct = _run(lambda st: st.ledger.get(check_account_id(account_id)))
    if as_json:
        _emit_json(acct, "card")
        return
    if not acct.has_card:
        click.echo(f"{acct.id}: no card stored")
        return
    token = acct.card_token if len(acct.card_token) <= 12 else acct.card_token[:8] + "..."
    click.echo(f"{acct.id}: {acct.card_brand} ****{acct.card_last4} exp {acct.card_exp} "
               f"(token {token})")


@card_group.command("remove")
@click.argument("account_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def card_remove(account_id: str, as_json: bool) -> None:
    """Forget ACCOUNT_ID's card; automatic top-ups fall back to e-mail warnings."""
    acct, switched = _run(lambda st: remove_card(st, account_id))
    if as_json:
        data = account_json(acct)
        click.echo(json.dumps({"account": acct.id, "card": None, "policy": data["policy"],
                               "switched_to_email": switched}, indent=2, sort_keys=True))
        return
    click.echo(f"{acct.id}: card removed"
               + ("; low-balance action switched from topup to email" if switched else ""))
