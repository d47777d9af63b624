"""``prepaid calls ACCOUNT [--limit N] [--json]``: the metered calls of one account."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ami_listener.meter import calls_key
from prepaid import config
from prepaid.config import Settings
from prepaid.errors import PrepaidError, StoreUnavailable
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
@click.option("--json", "as_json", is_flag=True, help="Print JSON (money in micro-units).")
@click.pass_context
def calls_cmd(ctx: click.Context, account: str, limit: int, as_json: bool) -> None:
    """Show the metered calls of ACCOUNT: number, rate, answer, end, billed time and cost."""
    try:
        check_account_id(account)
        settings = _settings(ctx.obj)
        currency, calls = asyncio.run(recent_calls(settings, account, limit))
    except PrepaidError as exc:
        raise click.ClickException(str(exc)) from None
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

