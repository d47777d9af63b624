"""``prepaid verify [ACCOUNT] [--json]``: the audit of balances, holds, history and calls."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import click

from prepaid.audit import Audit, Mismatch
from prepaid.config import Settings
from prepaid.store import open_store


def settings_of(ctx: click.Context) -> Settings:
    """The settings of the main ``prepaid`` group (its context object loads them)."""
    settings = getattr(ctx.find_root().obj, "settings", None)
    if not isinstance(settings, Settings):  # pragma: no cover - always run under main
        raise click.UsageError("run as a subcommand of prepaid")
    return settings


async def verify_all(settings: Settings, account: str | None, grace: float,
                     each: Any = None) -> tuple[int, list[Mismatch], float]:
    """Run the audit; ``each(mismatch)`` is called as each is found. Returns (accounts
    checked, mismatches, seconds)."""
    store = await open_store(settings)
    start = time.perf_counter()
    found: list[Mismatch] = []
    try:
        audit = Audit(store.ledger, grace=grace)
        async for m in audit.run(account):
            found.append(m)
            if each is not None:
                each(m)
    finally:
        await store.close()
    return audit.accounts, found, time.perf_counter() - start


@click.command("verify")
@click.argument("account", required=False)
@click.option("--grace", default=2.0, show_default=True, type=click.FloatRange(0, 600),
              help="Seconds a hold without a live call must stay so before it counts.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def verify_cmd(ctx: click.Context, account: str | None, grace: float, as_json: bool) -> None:
    """Check every account (or ACCOUNT): balance against history, holds against live calls,
    settled calls against their charges and rates, idempotency keys applied once.
    Exits 1 when anything does not match."""
    settings = settings_of(ctx)

    def show(m: Mismatch) -> None:
        click.echo(f"{m.account}: {m.kind}: {m.detail}")

    accounts, found, seconds = asyncio.run(
        verify_all(settings, account, grace, None if as_json else show))
    if as_json:
        click.echo(json.dumps({"accounts": accounts, "seconds": round(seconds, 3),
                               "clean": not found,
                               "mismatches": [m.to_json() for m in found]}, indent=2))
    else:
        click.echo(f"verified {accounts} account{'s' if accounts != 1 else ''} in "
                   f"{seconds:.2f} s: " + (f"{len(found)} mismatch"
                                           f"{'es' if len(found) != 1 else ''}"
                                           if found else "clean"))
    if found:
        sys.exit(1)
