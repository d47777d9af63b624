"""``prepaid history``, ``prepaid calls`` and ``prepaid report``: what happened, for one
account or all, over a date range, as rich tables, JSON or CSV.

Exports stream: entries are read one page at a time (prepaid/exports.py) and written as
they come, JSON and CSV alike, and the tables are printed a page at a time; the report
keeps totals only. Money is printed as decimal strings, as everywhere else.
"""

from __future__ import annotations

import asyncio
import csv
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, NoReturn, TextIO, TypeVar

import click
from rich.console import Console
from rich.table import Table

from prepaid import config, exports, outcomes
from prepaid.config import Settings
from prepaid.errors import InputError, PrepaidError, StoreUnavailable, UnknownAccount
from prepaid.exports import CallRow, HistoryRow
from prepaid.ledger import Account, check_account_id
from prepaid.money import format_amount
from prepaid.period import Period, parse_period
from prepaid.redis_client import REDIS_ERRORS, text
from prepaid.reporting import Report, plan_of
from prepaid.store import Store, open_store

T = TypeVar("T")
RECENT = 20  # rows shown without a range, newest first
TABLE_PAGE = 1000  # a long table is printed this many rows at a time


# -- plumbing -------------------------------------------------------------------------------
def _settings(ctx: click.Context) -> Settings:
    """The main group's settings (its context object has them), else the config file."""
    found = getattr(ctx.find_root().obj, "settings", None)
    return found if isinstance(found, Settings) else config.load()


def _fail(message: str) -> NoReturn:
    click.echo(f"prepaid: error: {message}", err=True)
    sys.exit(1)


def _run(ctx: click.Context, body: Callable[[Store], Awaitable[T]]) -> T:
    async def go() -> T:
        store = await open_store(_settings(ctx))
        try:
            return await body(store)
        finally:
            await store.close()
    try:
        return asyncio.run(go())
    except PrepaidError as exc:
        _fail(str(exc))


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return datetime.fromtimestamp(stamp).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _iso(stamp: float | None) -> str:
    return "" if stamp is None else datetime.fromtimestamp(stamp).astimezone().isoformat(
        timespec="milliseconds")


def _format(as_json: bool, as_csv: bool) -> str:
    if as_json and as_csv:
        raise InputError("--json and --csv: give one of them")
    return "json" if as_json else "csv" if as_csv else "table"


def _period(since: str | None, until: str | None) -> Period:
    return parse_period(since, until)


range_options = [
    click.option("--since", metavar="DATE", help="From DATE (YYYY-MM-DD: that day's start; "
                 "or YYYY-MM-DDTHH:MM[:SS][+HH:MM])."),
    click.option("--until", metavar="DATE", help="Up to DATE (a day: included; a time: "
                 "excluded)."),
    click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts."),
    click.option("--csv", "as_csv", is_flag=True, help="Print CSV (a header line, then rows)."),
]


def with_range(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(range_options):
        f = option(f)
    return f


class Rows:
    """Where rows go as they come: a JSON array (inside ``head``/``tail``), CSV, or rich
    tables of at most TABLE_PAGE rows each."""

    def __init__(self, form: str, columns: Sequence[str], title: str, *,
                 head: str = "", tail: str = "", out: TextIO | None = None,
                 nowrap: Sequence[str] = ("time", "answered", "number", "amount", "cost",
                                          "outcome", "balance")) -> None:
        self.form, self.columns, self.title, self.nowrap = form, columns, title, nowrap
        self.head, self.tail = head, tail
        self.out = out or sys.stdout
        self.count = 0
        self._table: Table | None = None
        self._csv = csv.writer(self.out, lineterminator="\n") if form == "csv" else None
        if self._csv is not None:
            self._csv.writerow(columns)
        elif form == "json":
            self.out.write(head + "[")

    def add(self, as_json: dict[str, Any], as_csv: Sequence[Any], as_table: Sequence[str]
            ) -> None:
        if self.form == "json":
            self.out.write(("," if self.count else "") + "\n  " + json.dumps(as_json,
                                                                            sort_keys=True))
        elif self._csv is not None:
            self._csv.writerow(as_csv)
        else:
            if self._table is None:
                self._table = Table(title=self.title if not self.count else None)
                for name in self.columns:
                    self._table.add_column(name, no_wrap=name in self.nowrap)
            self._table.add_row(*as_table)
            if self._table.row_count >= TABLE_PAGE:
                self._flush()
        self.count += 1

    def _flush(self) -> None:
        if self._table is not None:
            Console(highlight=False).print(self._table)
            self._table = None

    def close(self, empty: str) -> None:
        if self.form == "json":
            self.out.write(("\n" if self.count else "") + "]" + self.tail + "\n")
        elif self.form == "table":
            self._flush()
            if not self.count:
                click.echo(empty)
        self.out.flush()


async def _accounts(store: Store, account: str | None) -> AsyncIterator[str]:
    """The account named (checked by the caller), or every account."""
    if account is not None:
        yield account
        return
    async for each in exports.account_ids(store.ledger):
        yield each


async def _limited(rows: AsyncIterator[T], limit: int | None) -> AsyncIterator[T]:
    n = 0
    async for row in rows:
        if limit is not None and n >= limit:
            return
        yield row
        n += 1


def _check(account: str | None) -> None:
    if account is not None:
        check_account_id(account)


# -- history --------------------------------------------------------------------------------
HISTORY_CSV = ("time", "account", "kind", "amount", "balance", "held", "reference",
               "operator", "reason", "id")


def _history_out(rows: Rows, r: HistoryRow, currency: str, every: bool) -> None:
    amount = format_amount(r.amount, currency) if r.amount else "-"
    ref = f"{r.ref} (by {r.operator}: {r.reason})" if r.operator else r.ref
    shown = [_when(r.time), *([r.account] if every else []), r.kind, amount,
             format_amount(r.balance, currency), ref]
    rows.add(r.to_json(), [_iso(r.time), r.account, r.kind, format_amount(r.amount),
                           format_amount(r.balance), format_amount(r.held), r.ref, r.operator,
                           r.reason, r.id], shown)


@click.command()
@click.argument("account_id", required=False)
@click.option("--limit", type=click.IntRange(1, None), default=None,
              help=f"At most this many entries (default {RECENT}, newest first, without a "
                   "range or --csv; else all in the range, oldest first).")
@with_range
@click.pass_context
def history(ctx: click.Context, account_id: str | None, limit: int | None, since: str | None,
            until: str | None, as_json: bool, as_csv: bool) -> None:
    """Every change of ACCOUNT_ID's balance (of every account without one).

    Without --since/--until or --csv: the last 20, newest first. With them: each entry in
    the range, oldest first, streamed (account by account, without ACCOUNT_ID)."""
    try:
        _check(account_id)
        form, period = _format(as_json, as_csv), _period(since, until)
    except PrepaidError as exc:
        _fail(str(exc))
    recent = account_id is not None and not period.bounded and form != "csv"
    every = account_id is None
    currency = _settings(ctx).billing.currency

    title = f"account {account_id}" if account_id else "history of every account"
    columns = ("time", *(["account"] if every else []), "kind", "amount", "balance",
               "reference")

    async def body(store: Store) -> Rows:
        if account_id is not None:
            await store.ledger.get(account_id)  # unknown: the error comes before any output
        out = Rows(form, HISTORY_CSV if form == "csv" else columns, title)
        async for account in _accounts(store, account_id):
            rows_of = exports.history(store.ledger, account, period, newest_first=recent,
                                      archive=store.settings.archive.dir)
            async for r in _limited(rows_of, RECENT if recent and limit is None else limit):
                _history_out(out, r, currency, every)
        return out

    _run(ctx, body).close("no history in this range" if period.bounded else "no history")


# -- calls ----------------------------------------------------------------------------------
CALLS_CSV = ("ended", "account", "ref", "number", "prefix", "destination", "answered",
             "duration", "billed", "cost", "cause", "source", "cutoff")


def _call_out(rows: Rows, c: CallRow, currency: str, every: bool) -> None:
    note = f" (cut off at block {c.cutoff})" if c.cutoff else ""
    shown = [_when(c.answered or c.ended), *([c.account] if every else []), c.number,
             format_amount(c.cost, currency), f"{c.prefix} {c.rate}", str(c.billed),
             c.cause + note]
    rows.add(c.to_json(), [_iso(c.ended), c.account, c.ref, c.number, c.prefix, c.rate,
                           _iso(c.answered), c.duration, c.billed, format_amount(c.cost),
                           c.cause, c.source, c.cutoff], shown)


@click.command("calls")
@click.argument("account", required=False)
@click.option("--limit", type=click.IntRange(1, None), default=None,
              help=f"At most this many (default {RECENT}, newest first, without a range or "
                   "--csv; else all in the range, oldest first).")
@click.option("--refused", is_flag=True,
              help="Show refused authorizations instead: time, number, reason, server.")
@click.option("--outcomes", "all_outcomes", is_flag=True,
              help="Show every authorization outcome instead, allowed and refused.")
@with_range
@click.pass_context
def calls_cmd(ctx: click.Context, account: str | None, limit: int | None, refused: bool,
              all_outcomes: bool, since: str | None, until: str | None, as_json: bool,
              as_csv: bool) -> None:
    """The metered calls of ACCOUNT (of every account without one): number, rate, answer,
    billed time and cost.

    Without --since/--until or --csv: the last 20, newest first. With them: each call
    settled in the range, oldest first, streamed. With --refused (or --outcomes) the
    authorizations instead, as [agi] outcomes_keep and outcomes_days keep them: why each
    call was refused, when, and by which server."""
    try:
        _check(account)
        form, period = _format(as_json, as_csv), _period(since, until)
        if (refused or all_outcomes) and account is None:
            raise InputError("--refused and --outcomes need an ACCOUNT")
    except PrepaidError as exc:
        _fail(str(exc))
    if refused or all_outcomes:
        assert account is not None
        _outcomes(ctx, account, limit or RECENT, period, form, refused=not all_outcomes)
        return
    recent = account is not None and not period.bounded and form != "csv"
    every = account is None
    currency = _settings(ctx).billing.currency

    head = json.dumps({"account": account, "currency": currency})[:-1] + ', "calls": '
    columns = ("answered", *(["account"] if every else []), "number", "cost", "rate",
               "billed s", "cause")

    async def body(store: Store) -> Rows:
        if account is not None:
            await store.ledger.get(account)  # unknown: the error comes before any output
        out = Rows(form, CALLS_CSV if form == "csv" else columns,
                   f"calls of {account}" if account else "calls of every account",
                   head=head, tail="}")
        async for each in _accounts(store, account):
            rows_of = exports.calls(store.ledger, each, period, newest_first=recent,
                                    archive=store.settings.archive.dir)
            async for c in _limited(rows_of, RECENT if recent and limit is None else limit):
                _call_out(out, c, currency, every)
        return out

    _run(ctx, body).close(f"no calls metered for {account or 'any account'} in this range"
              if period.bounded else f"no calls metered for {account or 'any account'} yet")


OUTCOMES_CSV = ("time", "account", "number", "status", "reason", "max_seconds", "server",
                "host", "ref")


def _outcomes(ctx: click.Context, account: str, limit: int, period: Period, form: str, *,
              refused: bool) -> None:
    """An account's authorization outcomes, newest first. For an account that does not
    exist: its refusals as an unknown account, if any are kept."""
    async def body(store: Store) -> tuple[bool, list[outcomes.Outcome]]:
        try:
            await store.ledger.get(account)
            known = True
        except UnknownAccount:
            known = False
        found: list[outcomes.Outcome] = []
        async for o in outcomes.read(store.redis, store.settings.redis.key_prefix, account,
                                     start=period.start_id, end=period.end_id,
                                     refused_only=refused, unknown=not known):
            found.append(o)
            if len(found) >= limit:
                break
        if not known and not found:
            raise UnknownAccount(account)
        return known, found

    known, found = _run(ctx, body)
    what = "refused calls" if refused else "authorizations"
    head = json.dumps({"account": account, "known": known})[:-1] + ', "outcomes": '
    out = Rows(form, OUTCOMES_CSV if form == "csv" else
               ("time", "number", "outcome", "max s", "server (AGI host)", "ref"),
               f"{what} of {account}" + ("" if known else " (no such account)"),
               head=head, tail="}")
    for o in found:
        out.add(o.to_json(), [_iso(o.time), o.account, o.number, o.status, o.reason,
                              o.max_seconds, o.server, o.host, o.ref],
                [_when(o.time), o.number or "-", f"{o.status} {o.reason}".strip(),
                 str(o.max_seconds) if o.allowed else "-",
                 f"{o.server or '-'} ({o.host or '-'})", o.ref or "-"])
    out.close(f"no {what} of {account} kept")


# -- report ---------------------------------------------------------------------------------
async def build_report(store: Store, period: Period) -> Report:
    """Every account's calls and history in ``period``, page by page, into totals."""
    report = Report()
    async for account in exports.account_ids(store.ledger):
        try:
            raw = await store.redis.hgetall(store.ledger.account_key(account))
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"Redis is unavailable reading account {account}: {exc}"
                                   ) from exc
        fields = {text(k): text(v) for k, v in raw.items()}
        if not fields:
            continue  # in the index, not (or no longer) an account
        plan = plan_of(fields)
        async for call in exports.calls(store.ledger, account, period,
                                        archive=store.settings.archive.dir):
            report.add_call(call, call.plan or plan)  # the plan it was rated with
        async for row in exports.history(store.ledger, account, period,
                                         archive=store.settings.archive.dir):
            report.add_history(row)
        report.add_account(Account.from_hash(fields))
    return report


REPORT_CSV = ("section", "name", "count", "billed_seconds", "minutes", "amount", "note")


def _report_csv(data: dict[str, Any]) -> None:
    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow(REPORT_CSV)
    c = data["calls"]
    w.writerow(["calls", "all", c["calls"], c["billed_seconds"], c["minutes"], c["revenue"],
                ""])
    for section, key in (("destination", "destination"), ("plan", "plan"),
                         ("account", "account")):
        for row in data[f"by_{section}"]:
            name = f"{row['prefix']} {row[key]}" if section == "destination" else row[key]
            w.writerow([section, name, row["calls"], row["billed_seconds"], row["minutes"],
                        row["revenue"], ""])
    for row in data["topups"]:
        w.writerow(["topup", row["kind"], row["count"], "", "", row["amount"], ""])
    for row in data["watch"]:
        w.writerow(["watch", row["account"], "", "", "", row["balance"], row["why"]])


def _report_tables(data: dict[str, Any], currency: str) -> None:
    console = Console(highlight=False)
    p, c = data["period"], data["calls"]
    span = f"{p['since'] or 'the start'} to {p['until'] or 'now'}"
    console.print(f"Report from {span}: {c['calls']} calls, {c['minutes']} minutes, "
                  f"revenue {currency} {c['revenue']}")

    def money(text: str) -> str:
        return f"{currency} {text}"

    for title, key, name in (("by destination", "by_destination", "destination"),
                             ("by plan", "by_plan", "plan"), ("by account", "by_account",
                                                              "account")):
        table = Table(name, "calls", "minutes", "revenue", title=title)
        for row in data[key]:
            label = f"{row['prefix']} {row[name]}" if name == "destination" else row[name]
            table.add_row(label, str(row["calls"]), row["minutes"], money(row["revenue"]))
        console.print(table)
    table = Table("kind", "count", "amount", title="top-ups by kind")
    for row in data["topups"]:
        table.add_row(row["kind"], str(row["count"]), money(row["amount"]))
    console.print(table)
    table = Table("account", "status", "balance", "why", title="accounts to look at (now)")
    for row in data["watch"]:
        table.add_row(row["account"], row["status"], money(row["balance"]), row["why"])
    console.print(table)


@click.command("report")
@with_range
@click.pass_context
def report_cmd(ctx: click.Context, since: str | None, until: str | None, as_json: bool,
               as_csv: bool) -> None:
    """Calls, minutes and revenue by destination, plan and account, top-ups by kind, for
    the range; and the accounts suspended or below their threshold now."""
    try:
        form, period = _format(as_json, as_csv), _period(since, until)
    except PrepaidError as exc:
        _fail(str(exc))
    report = _run(ctx, lambda store: build_report(store, period))
    currency = _settings(ctx).billing.currency
    data = {"period": period.to_json(), "currency": currency, **report.to_json()}
    if form == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    elif form == "csv":
        _report_csv(data)
    else:
        _report_tables(data, currency)


COMMANDS = (history, calls_cmd, report_cmd)
