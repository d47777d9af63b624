"""An account's lifecycle: ``prepaid account set`` and ``prepaid account close`` (suspend
and resume stay in shell/cli.py beside create and show)."""

from __future__ import annotations

import json

import click

from prepaid import corrections, plans
from prepaid.errors import InputError
from prepaid.inputs import check_email, check_text
from prepaid.ledger import Account, account_json, check_account_id
from prepaid.money import format_amount
from prepaid.ratedeck import check_plan
from prepaid.store import Store
from shell.ops import Obj, json_option, operator_option

MAX_NAME, MAX_NOTE = 100, 500


def check_reason(reason: str) -> str:
    return corrections.check_reason(reason)


def check_open(acct: Account) -> Account:
    """Money comes in only while the account is open (corrections may still zero it)."""
    if acct.status == "closed":
        raise InputError(f"account {acct.id!r} is closed")
    return acct


def _emit(acct: Account) -> None:
    click.echo(json.dumps(account_json(acct), indent=2, sort_keys=True))


@click.command("set")
@click.argument("account_id")
@click.option("--email", default=None, help="Where receipts and warnings go ('' for none).")
@click.option("--name", default=None, help="Who the account belongs to ('' to clear).")
@click.option("--note", default=None, help="A note for admins ('' to clear).")
@click.option("--plan", default=None, metavar="PLAN",
              help="Rate its calls by PLAN's deck (in the account's currency).")
@json_option
@click.pass_obj
def account_set(obj: Obj, account_id: str, email: str | None, name: str | None,
                note: str | None, plan: str | None, as_json: bool) -> None:
    """Change ACCOUNT_ID's e-mail address, name, note or plan. A new plan rates the calls
    authorized from now on; calls already up keep the rate they were authorized with."""
    check_account_id(account_id)
    values: dict[str, str] = {}
    if email is not None:
        values["email"] = check_email(email)
    if name is not None:
        values["name"] = check_text(name, "--name", limit=MAX_NAME)
    if note is not None:
        values["note"] = check_text(note, "--note", limit=MAX_NOTE)
    if plan is not None:
        values["plan"] = check_plan(plan)
    if not values:
        raise click.UsageError("give at least one of --email, --name, --note, --plan")

    async def body(st: Store) -> Account:
        if plan is not None:  # nothing is converted: the plan must be in its currency
            acct = await st.ledger.get(account_id)
            plans.check_match(plan, await plans.currency_of(st, plan), acct.currency,
                              f"account {account_id} ({acct.currency}) --plan {plan}")
        return await st.ledger.update(account_id, **values)

    acct = obj.run(body)
    if as_json:
        _emit(acct)
        return
    click.echo(f"account {acct.id}: " + ", ".join(
        f"{k} {v!r}" if v else f"{k} cleared" for k, v in values.items()))


@click.command("close")
@click.argument("account_id")
@click.option("--reason", default="closed by the admin", show_default=True,
              help="Why (kept in history and shown by account show).")
@operator_option
@click.option("--force", is_flag=True,
              help="Close even with a balance left or live calls holding credit.")
@json_option
@click.pass_obj
def account_close(obj: Obj, account_id: str, reason: str, operator: str | None, force: bool,
                  as_json: bool) -> None:
    """Close ACCOUNT_ID for good: no new calls, no top-ups. Refused while its balance is not
    zero or live calls hold credit, unless --force. Its history stays, and the id is never
    given to a new account."""
    check_account_id(account_id)
    check_reason(reason)
    who = corrections.operator_name(operator)
    acct, before = obj.run(lambda st: st.ledger.close(account_id, operator=who, reason=reason,
                                                     force=force))
    if as_json:
        click.echo(json.dumps({**account_json(acct), "closed_before": before}, indent=2,
                              sort_keys=True))
    elif before:
        click.echo(f"account {acct.id} was closed before (nothing changed)")
    else:
        left = (f"; balance {format_amount(acct.balance, acct.currency)} left"
                if acct.balance else "")
        click.echo(f"account {acct.id} is closed by {who} ({reason}){left}")
