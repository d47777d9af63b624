"""``prepaid calls ACCOUNT [--limit N] [--json]``: the metered calls of one account, or with
``--refused`` / ``--outcomes`` its authorization outcomes (prepaid/outcomes.py)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ami_listener.meter import calls_key
from prepaid import config, outcomes
from prepaid.config import Settings
from prepaid.errors import PrepaidError, StoreUnavailable, UnknownAccount
from prepaid.ledger import check_account_id
from prepaid.money import format_amount
from prepaid.redis_client import REDIS_ERRORS, text
from prepaid.store import open_store


async def recent_calls(settings: Settings, account: str, limit: int) -> tuple[str, list[dict[
        str, Any]]]:
    """The account's currency and its last ``limit`` calls, newest first."""
    store = await open_store(settings)
    try:
        acct = await store.ledger.get(account)
        try:
            rows = await store.redis.xrevrange(calls_key(store.ledger, account), count=limit)
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"Redis at {settings.redis.safe_url} is unavailable: {exc}"
                                   ) from exc
    finally:
        await store.close()
    calls = []
    for _, fields in rows or []:
        f = {text(k): text(v) for k, v in (fields or {}).items()}
        calls.append({"ref": f["ref"], "number": f["number"], "prefix": f["prefix"],
                      "rate": f["rate"],
                      "answered": float(f["answered"]) if f["answered"] else None,
                      "ended": float(f["ended"]) if f["ended"] else None,
                      "duration": int(f["duration"]), "billed": int(f["billed"]),
                      "cost": int(f["cost"]), "cause": f["cause"], "source": f["source"],
                      "cutoff": int(f["cutoff"])})
    return acct.currency, calls


async def recent_outcomes(settings: Settings, account: str, limit: int, *, refused_only: bool
                          ) -> tuple[bool, list[outcomes.Outcome]]:
    """Whether the account exists, and its last ``limit`` outcomes, newest first. For an
    account that does not exist: its refusals as an unknown account, if any are kept."""
    store = await open_store(settings)
    prefix = settings.redis.key_prefix
    try:
        try:
            await store.ledger.get(account)
            known = True
        except UnknownAccount:
            known = False
        found: list[outcomes.Outcome] = []
        async for outcome in outcomes.read(store.redis, prefix, account,
                                           refused_only=refused_only, unknown=not known):
            found.append(outcome)
            if len(found) >= limit:
                break
    finally:
        await store.close()
    if not known and not found:
        raise UnknownAccount(account)
    return known, found


def _settings(obj: object) -> Settings:
    """The settings of the main ``prepaid`` group (its context object), else the default file."""
    if isinstance(obj, Settings):
        return obj
    found = getattr(obj, "settings", None) if obj is not None else None
    return found if isinstance(found, Settings) else config.load()


def _when(stamp: float | None) -> str:
    return "-" if stamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


@click.command("calls")
@click.argument("account")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000),
              help="How many calls, newest first.")
@click.option("--refused", is_flag=True,
              help="Show refused authorizations instead: time, number, reason, server.")
@click.option("--outcomes", "all_outcomes", is_flag=True,
              help="Show every authorization outcome instead, allowed and refused.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (money in micro-units).")
@click.pass_context
def calls_cmd(ctx: click.Context, account: str, limit: int, refused: bool, all_outcomes: bool,
              as_json: bool) -> None:
    """Show the metered calls of ACCOUNT: number, rate, answer, end, billed time and cost.

    With --refused (or --outcomes) the authorizations instead, as [agi] outcomes_keep and
    outcomes_days keep them: why each call was refused, when, and by which server."""
    try:
        check_account_id(account)
        settings = _settings(ctx.obj)
        if refused or all_outcomes:
            known, found = asyncio.run(recent_outcomes(settings, account, limit,
                                                       refused_only=not all_outcomes))
            _print_outcomes(account, known, found, refused=not all_outcomes, as_json=as_json)
            return
        currency, calls = asyncio.run(recent_calls(settings, account, limit))
    except PrepaidError as exc:
        click.echo(f"prepaid: error: {exc}", err=True)
        ctx.exit(1)
    if as_json:
        click.echo(json.dumps({"account": account, "currency": currency, "calls": calls},
                              indent=2))
        return
    table = Table(title=f"calls of {account}")
    for name in ("answered", "number", "cost"):
        table.add_column(name, no_wrap=True)
    for name in ("rate", "billed s", "cause"):
        table.add_column(name)
    for c in calls:
        note = f" (cut off at block {c['cutoff']})" if c["cutoff"] else ""
        table.add_row(_when(c["answered"] or c["ended"]), c["number"],
                      format_amount(c["cost"], currency),
                      f"{c['prefix']} {c['rate']}", str(c["billed"]), c["cause"] + note)
    Console().print(table)
    if not calls:
        click.echo(f"no calls metered for {account} yet")



def _print_outcomes(account: str, known: bool, found: list[outcomes.Outcome], *,
                    refused: bool, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"account": account, "known": known,
                               "outcomes": [o.to_json() for o in found]}, indent=2))
        return
    what = "refused calls" if refused else "authorizations"
    title = f"{what} of {account}" + ("" if known else " (no such account)")
    table = Table(title=title)
    for name in ("time", "number", "outcome"):
        table.add_column(name, no_wrap=True)
    for name in ("max s", "server (AGI host)", "ref"):
        table.add_column(name)
    for o in found:
        table.add_row(_when(o.time), o.number or "-", f"{o.status} {o.reason}".strip(),
                      str(o.max_seconds) if o.allowed else "-",
                      f"{o.server or '-'} ({o.host or '-'})", o.ref or "-")
    Console().print(table)
    if not found:
        click.echo(f"no {what} of {account} kept")
