"""Admin corrections: ``prepaid adjust``, ``prepaid refund`` and ``prepaid reverse``.

The work is in prepaid/corrections.py; these wrappers parse, print and leave errors to the
main group (one ``prepaid: error:`` line).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import click

from prepaid import corrections
from prepaid.config import Settings
from prepaid.corrections import Correction
from prepaid.errors import InputError
from prepaid.inputs import check_reference
from prepaid.ledger import Account
from prepaid.money import format_amount, parse_amount
from prepaid.store import Store

T = TypeVar("T")


class Obj(Protocol):
    """The main group's context object (shell.cli.Context)."""

    @property
    def settings(self) -> Settings: ...

    def run(self, body: Callable[[Store], Awaitable[T]]) -> T: ...


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
operator_option = click.option("--operator", default=None,
                               help="Who makes the correction (default: the Unix user).")


def signed_amount(settings: Settings, raw: str) -> int:
    """``-5.00`` or ``+5``/``5``, in micro-units."""
    body = raw.strip()
    sign = -1 if body.startswith("-") else 1
    magnitude = body[1:] if body[:1] in "+-" and body else body
    try:
        return sign * parse_amount(magnitude, decimals=settings.billing.decimals)
    except InputError as exc:  # name what was typed, sign and all
        raise InputError(str(exc).replace(repr(magnitude), repr(raw), 1)) from None


def _emit(c: Correction, acct: Account) -> None:
    data: dict[str, Any] = {
        "account": c.account, "kind": c.kind, "amount": format_amount(c.amount),
        "reference": c.reference, "operator": c.operator, "reason": c.reason,
        "duplicate": c.duplicate, "balance": format_amount(acct.balance),
        "available": format_amount(acct.available), "entry": c.change.entry}
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _report(c: Correction, acct: Account, as_json: bool, done: str, again: str) -> None:
    if as_json:
        _emit(c, acct)
        return
    cur = acct.currency
    if c.duplicate:
        click.echo(f"{again} (applied earlier, nothing changed); balance now "
                   f"{format_amount(acct.balance, cur)}")
        return
    click.echo(f"{done} {format_amount(c.amount, cur)} on {c.account} by {c.operator} "
               f"({c.reason}); balance {format_amount(acct.balance, cur)}")


def _apply(obj: Obj, work: Callable[[Store], Awaitable[Correction]]) -> tuple[Correction,
                                                                               Account]:
    async def body(st: Store) -> tuple[Correction, Account]:
        c = await work(st)
        return c, await st.ledger.get(c.account)  # a duplicate's Change is the first one's
    return obj.run(body)


@click.command("adjust", context_settings={"ignore_unknown_options": True})
@click.argument("account_id")
@click.argument("amount")
@click.option("--reason", required=True, help="Why the balance is corrected (kept in history).")
@click.option("--reference", default=None,
              help="The correction's reference; the same reference never applies twice.")
@operator_option
@click.option("--force", is_flag=True, help="Allow a negative correction below a zero balance.")
@json_option
@click.pass_obj
def adjust_cmd(obj: Obj, account_id: str, amount: str, reason: str, reference: str | None,
               operator: str | None, force: bool, as_json: bool) -> None:
    """Correct ACCOUNT_ID's balance by AMOUNT: 2.50 adds, -2.50 takes away."""
    micros = signed_amount(obj.settings, amount)
    corrections.check_reason(reason)
    ref = check_reference(reference) if reference is not None else (
        f"adjust-{uuid.uuid4().hex[:12]}")
    who = corrections.operator_name(operator)
    c, acct = _apply(obj, lambda st: corrections.adjust(
        st.ledger, account_id, micros, reason=reason, reference=ref, operator=who, force=force))
    _report(c, acct, as_json, "adjusted by",
            f"correction {ref} was already applied to {c.account}")


@click.command("refund")
@click.argument("reference")
@click.option("--account", "account_id", default=None,
              help="The account topped up (default: found by REFERENCE).")
@click.option("--reason", default="top-up refunded", show_default=True,
              help="Why (kept in history).")
@operator_option
@click.option("--force", is_flag=True,
              help="Allow the refund to take the balance below zero (the credit was spent).")
@json_option
@click.pass_obj
def refund_cmd(obj: Obj, reference: str, account_id: str | None, reason: str,
               operator: str | None, force: bool, as_json: bool) -> None:
    """Take back the credit of the top-up REFERENCE (a manual top-up's reference, or an
    automatic or phone top-up's charge id), once."""
    who = corrections.operator_name(operator)
    c, acct = _apply(obj, lambda st: corrections.refund(
        st.ledger, reference, account=account_id, reason=reason, operator=who, force=force))
    _report(c, acct, as_json, f"refunded top-up {reference}:",
            f"top-up {reference} of {c.account} was already refunded")


@click.command("reverse")
@click.argument("reference")
@click.option("--account", "account_id", default=None,
              help="The account that paid for the call (default: found by REFERENCE).")
@click.option("--reason", default="call charge reversed", show_default=True,
              help="Why (kept in history).")
@operator_option
@json_option
@click.pass_obj
def reverse_cmd(obj: Obj, reference: str, account_id: str | None, reason: str,
                operator: str | None, as_json: bool) -> None:
    """Give back what the ended call REFERENCE (its reference in `prepaid calls`) was
    charged, once."""
    who = corrections.operator_name(operator)
    c, acct = _apply(obj, lambda st: corrections.reverse(
        st.ledger, reference, account=account_id, reason=reason, operator=who))
    _report(c, acct, as_json, f"reversed call {reference}:",
            f"call {reference} of {c.account} was already reversed")


COMMANDS = (adjust_cmd, refund_cmd, reverse_cmd)
