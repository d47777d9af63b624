"""``prepaid verify [ACCOUNT] [--json]``: the audit of balances, holds, history and calls;
``prepaid archive [--before DATE] [--dir PATH] [--format jsonl|csv]``: old history and calls
moved to monthly files."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from prepaid.archive import Archiver, Result, check_dir
from prepaid.audit import Audit, Mismatch
from prepaid.config import Settings
from prepaid.errors import InputError
from prepaid.store import open_store


def settings_of(ctx: click.Context) -> Settings:
    """The settings of the main ``prepaid`` group (its context object loads them)."""
    settings = getattr(ctx.find_root().obj, "settings", None)
    if not isinstance(settings, Settings):  # pragma: no cover - always run under main
        raise click.UsageError("run as a subcommand of prepaid")
    return settings


async def verify_all(settings: Settings, account: str | None, grace: float,
                     each: Any = None, archive: Path | None = None
                     ) -> tuple[int, list[Mismatch], float]:
    """Run the audit; ``each(mismatch)`` is called as each is found. Returns (accounts
    checked, mismatches, seconds)."""
    store = await open_store(settings)
    start = time.perf_counter()
    found: list[Mismatch] = []
    try:
        audit = Audit(store.ledger, grace=grace, archive=archive)
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
@click.option("--archive-dir", type=click.Path(path_type=Path), default=None,
              help="Where the archived history and calls are (default [archive] dir).")
@click.option("--no-archive", is_flag=True,
              help="Do not read the archive: start each account at its archived balance.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def verify_cmd(ctx: click.Context, account: str | None, grace: float, archive_dir: Path | None,
               no_archive: bool, as_json: bool) -> None:
    """Check every account (or ACCOUNT): balance against history, holds against live calls,
    settled calls against their charges and rates, idempotency keys applied once, the
    archived part included. Exits 1 when anything does not match."""
    settings = settings_of(ctx)
    root = None if no_archive else (archive_dir or settings.archive.dir)

    def show(m: Mismatch) -> None:
        click.echo(f"{m.account}: {m.kind}: {m.detail}")

    accounts, found, seconds = asyncio.run(
        verify_all(settings, account, grace, None if as_json else show, root))
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


def parse_before(text: str | None, retention_days: int, now: datetime | None = None) -> datetime:
    """``--before``: a day (YYYY-MM-DD, midnight UTC) or a UTC time (2026-01-31T12:00:00Z);
    by default the start of the day ``retention_days`` ago."""
    now = now or datetime.now(UTC)
    if text is None:
        day = now - timedelta(days=retention_days)
        return day.replace(hour=0, minute=0, second=0, microsecond=0)
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
                        r"(T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|\+00:00))?", text):
        raise InputError(f"--before {text!r} must be a date like 2026-01-31 or a UTC time "
                         "like 2026-01-31T12:00:00Z")
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"--before {text!r} is not a date of the calendar") from None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    if when > now:
        raise InputError(f"--before {text} is in the future: only what is past is archived")
    if when.year < 2000:
        raise InputError(f"--before {text}: nothing is that old")
    return when


async def archive_all(settings: Settings, before: datetime, root: Path, fmt: str) -> Result:
    store = await open_store(settings)
    try:
        return await Archiver(store.ledger, root, fmt).run(int(before.timestamp() * 1000))
    finally:
        await store.close()


@click.command("archive")
@click.option("--before", "before_text", metavar="DATE", default=None,
              help="Archive what is older than this day (YYYY-MM-DD, UTC; default: "
                   "[archive] retention_days ago).")
@click.option("--dir", "root", type=click.Path(path_type=Path), default=None,
              help="Where the monthly files go (default [archive] dir).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default=None,
              help="File format (default [archive] format).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def archive_cmd(ctx: click.Context, before_text: str | None, root: Path | None,
                fmt: str | None, as_json: bool) -> None:
    """Move history and calls older than DATE to monthly files (DIR/YYYY-MM/ACCOUNT.history
    .jsonl, .calls.jsonl), fsynced, then trim them from Redis. Safe to repeat."""
    settings = settings_of(ctx)
    before = parse_before(before_text, settings.archive.retention_days)
    root = root or settings.archive.dir
    check_dir(root)  # before Redis is touched
    result = asyncio.run(archive_all(settings, before, root, fmt or settings.archive.format))
    day = before.strftime("%Y-%m-%d")
    if as_json:
        click.echo(json.dumps({"before": day, "dir": str(root), **result.to_json()}, indent=2))
        return
    click.echo(f"archived {result.history} history entries and {result.calls} calls of "
               f"{result.accounts} account{'s' if result.accounts != 1 else ''} older than "
               f"{day} to {root} ({len(result.files or ())} files)")
