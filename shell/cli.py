"""The ``prepaid`` command: accounts, top-ups, balances, history, rate decks and ``serve``."""

from __future__ import annotations

import asyncio
import csv
import json
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from agi.commands import sounds
from policy.commands import card_group, manual_topup, policy_cmd
from policy.web.admin import web_admin
from policy.web.support import requests_cmd
from prepaid import config as config_mod
from prepaid import health, holds, plans
from prepaid.config import Settings
from prepaid.errors import PrepaidError, RateError
from prepaid.inputs import check_email, check_reference
from prepaid.ledger import Account, Change, account_json, check_account_id
from prepaid.money import check_currency, format_amount, parse_amount
from prepaid.pins import check_pin, set_pin
from prepaid.ratedeck import (
    CSV_COLUMNS,
    check_plan,
    iter_csv,
    load_csv,
    rate_row,
    read_lines,
)
from prepaid.ratestore import ImportReport, Quote
from prepaid.rating import Rate, billed_seconds, cost
from prepaid.store import Store, open_store
from shell import lifecycle, ops, reports
from shell.audit import archive_cmd, verify_cmd
from shell.deadletters import dead_letters
from shell.serve import default_services, serve_forever

T = TypeVar("T")
LOOKUP_DURATIONS = (1, 30, 60, 61, 3600)
console = Console(highlight=False)


class Context:
    def __init__(self, config_path: Path | None) -> None:
        self.config_path = config_path
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = config_mod.load(self.config_path)
        return self._settings

    def run(self, body: Callable[[Store], Awaitable[T]]) -> T:
        async def go() -> T:
            store = await open_store(self.settings)
            try:
                return await body(store)
            finally:
                await store.close()
        return asyncio.run(go())


pass_ctx = click.make_pass_decorator(Context)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
plan_option = click.option("--plan", default=None, metavar="PLAN",
                           help="The plan (rate deck) [default: [billing] default_plan].")


def _fail(message: str) -> None:
    click.echo(f"prepaid: error: {message}", err=True)
    sys.exit(1)


def _click_fail(exc: click.ClickException) -> None:
    """click's own errors (usage, a bad option value) in the one style, on one line."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    if isinstance(exc, click.UsageError) and exc.ctx is not None:
        names = [c.info_name or "" for c in reversed(list(_chain(exc.ctx)))][1:]
        message += f" (see '{' '.join(['prepaid', *names])} -h')"
    click.echo(f"prepaid: error: {message}", err=True)
    sys.exit(exc.exit_code)


def _chain(ctx: click.Context) -> Iterator[click.Context]:
    """The context and its parents up to the root (whose name may be 'main' in tests)."""
    at: click.Context | None = ctx
    while at is not None:
        yield at
        at = at.parent


class Group(click.Group):
    """Turns every project error, and click's, into one clear line and a non-zero exit."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise  # `prepaid` alone prints the help
        except click.ClickException as exc:
            _click_fail(exc)
            raise  # not reached: for mypy

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PrepaidError as exc:
            _fail(str(exc))
        except click.exceptions.NoArgsIsHelpError:
            raise  # `prepaid account` alone prints the group's help
        except click.ClickException as exc:
            _click_fail(exc)
        except KeyboardInterrupt:
            sys.exit(130)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _emit(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _amount(settings: Settings, text: str, what: str = "amount") -> int:
    return parse_amount(text, decimals=settings.billing.decimals, what=what)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar=config_mod.ENV_CONFIG, help="TOML config file (default $PREPAID_CONFIG).")
@click.version_option(package_name="asterisk-prepaid")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """Prepaid call credit for Asterisk."""
    ctx.obj = Context(config_path)


# -- accounts ---------------------------------------------------------------
@main.group()
def account() -> None:
    """Create, show, list, suspend and resume accounts."""


@account.command("create")
@click.argument("account_id")
@click.option("--email", default="", help="Where receipts and warnings go.")
@click.option("--currency", default=None, help="ISO 4217 code (default: the plan's).")
@plan_option
@json_option
@pass_ctx
def account_create(obj: Context, account_id: str, email: str, currency: str | None,
                   plan: str | None, as_json: bool) -> None:
    """Create ACCOUNT_ID (the caller's accountcode or extension) with a zero balance, rated
    by PLAN's deck; its currency is the plan's."""
    check_account_id(account_id)
    s = obj.settings
    plan = check_plan(plan or s.billing.default_plan)
    cur = check_currency(currency.upper()) if currency is not None else None
    check_email(email)

    async def body(st: Store) -> Account:
        plan_cur = await plans.currency_of(st, plan)
        plans.check_match(plan, plan_cur, cur or plan_cur, f"--currency {cur}")
        return await st.ledger.create_account(
            account_id, currency=plan_cur, email=email, threshold=s.policy.threshold,
            action=s.policy.action, topup_amount=s.policy.topup_amount, plan=plan)

    acct = obj.run(body)
    if as_json:
        _emit(account_json(acct))
    else:
        click.echo(f"created account {acct.id} ({acct.currency}, plan {acct.plan}), balance "
                   f"{format_amount(acct.balance, acct.currency)}")


def _show(acct: Account) -> None:
    table = Table(show_header=False, box=None)
    cur = acct.currency
    status = f"{acct.status} ({acct.status_reason})" if acct.status_reason else acct.status
    if acct.closed:
        status += f" since {_when(acct.closed)}"
    rows = [("account", acct.id), ("name", acct.name or "-"), ("status", status),
            ("currency", cur), ("plan", acct.plan),
            ("e-mail", acct.email or "-"), ("balance", format_amount(acct.balance, cur)),
            ("held for live calls", format_amount(acct.held, cur)),
            ("available", format_amount(acct.available, cur)), ("created", _when(acct.created)),
            ("low-balance action", acct.action if acct.policy_enabled else f"{acct.action} (off)"),
            ("threshold", format_amount(acct.threshold, cur))]
    if acct.action == "topup":
        rows.append(("top-up amount", format_amount(acct.topup_amount, cur)))
    rows.append(("card", f"{acct.card_brand} ****{acct.card_last4} exp {acct.card_exp}"
                 if acct.has_card else "none"))
    if acct.note:
        rows.append(("note", acct.note))
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


@account.command("show")
@click.argument("account_id")
@json_option
@pass_ctx
def account_show(obj: Context, account_id: str, as_json: bool) -> None:
    """Show an account: balance, holds, status, policy and card."""
    acct = obj.run(lambda st: st.ledger.get(account_id))
    _emit(account_json(acct)) if as_json else _show(acct)


@account.command("list")
@json_option
@pass_ctx
def account_list(obj: Context, as_json: bool) -> None:
    """List all accounts with their balances."""
    async def body(st: Store) -> list[Account]:
        return [await st.ledger.get(i) for i in await st.ledger.list_ids()]
    accounts = obj.run(body)
    if as_json:
        _emit([account_json(a) for a in accounts])
        return
    table = Table("account", "status", "plan", "balance", "available", "e-mail")
    for a in accounts:
        table.add_row(a.id, a.status, a.plan, format_amount(a.balance, a.currency),
                      format_amount(a.available, a.currency), a.email or "-")
    console.print(table)


def _set_status(obj: Context, account_id: str, status: str, reason: str,
                as_json: bool) -> None:
    check_account_id(account_id)
    acct = obj.run(lambda st: st.ledger.set_status(account_id, status, reason))
    if as_json:
        _emit(account_json(acct))
    else:
        click.echo(f"account {acct.id} is {acct.status}" + (f" ({reason})" if reason else ""))


@account.command("suspend")
@click.argument("account_id")
@click.option("--reason", default=None, help="Why (kept and shown by account show).")
@json_option
@pass_ctx
def account_suspend(obj: Context, account_id: str, reason: str | None, as_json: bool) -> None:
    """Stop ACCOUNT_ID from placing calls (calls already up go on)."""
    _set_status(obj, account_id, "suspended",
                "" if reason is None else lifecycle.check_reason(reason), as_json)


@account.command("resume")
@click.argument("account_id")
@json_option
@pass_ctx
def account_resume(obj: Context, account_id: str, as_json: bool) -> None:
    """Let a suspended account call again (a closed one stays closed)."""
    _set_status(obj, account_id, "active", "", as_json)


@account.command("pin")
@click.argument("account_id")
@click.option("--clear", is_flag=True, help="Remove the PIN (self-service is then closed).")
@json_option
@pass_ctx
def account_pin(obj: Context, account_id: str, clear: bool, as_json: bool) -> None:
    """Set the self-service PIN of ACCOUNT_ID (phone menu and web page), asked twice and
    not echoed; read from standard input when it is not a terminal."""
    pin: str | None = None
    if not clear:
        pin = (click.prompt("New PIN", hide_input=True, confirmation_prompt=True)
               if sys.stdin.isatty() else sys.stdin.readline().strip())
        check_pin(pin)
    obj.run(lambda st: set_pin(st.ledger, account_id, pin))
    if as_json:
        _emit({"account": account_id, "pin": "cleared" if clear else "set"})
    else:
        click.echo(f"account {account_id}: PIN {'cleared' if clear else 'set'}")


# -- money ------------------------------------------------------------------
@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("account_id")
@click.argument("amount")
@click.option("--reference", default=None,
              help="Payment reference; the same reference never credits twice.")
@click.option("--override", is_flag=True, help="Allow an amount above [policy] max_topup.")
@json_option
@pass_ctx
def topup(obj: Context, account_id: str, amount: str, reference: str | None, override: bool,
          as_json: bool) -> None:
    """Credit AMOUNT, in currency units like 10.00, to ACCOUNT_ID."""
    check_account_id(account_id)
    micros = _amount(obj.settings, amount)
    ref = check_reference(reference) if reference is not None else (
        f"manual-{uuid.uuid4().hex[:12]}")
    problems: list[str] = []

    async def body(st: Store) -> tuple[Account, Change]:
        lifecycle.check_open(await st.ledger.get(account_id))
        change = await manual_topup(st, account_id, micros, ref, override=override,
                                    problems=problems)
        # A duplicate's Change holds the balance of the first credit: show today's.
        return await st.ledger.get(account_id), change

    acct, change = obj.run(body)
    if as_json:
        _emit({"account": account_id, "amount": format_amount(micros), "reference": ref,
               "balance": format_amount(acct.balance), "duplicate": change.duplicate,
               "problems": problems})
    elif change.duplicate:
        click.echo(f"reference {ref} was already credited (applied earlier, nothing changed); "
                   f"balance now {format_amount(acct.balance, acct.currency)}")
    else:
        click.echo(f"credited {format_amount(micros, acct.currency)} to {account_id} "
                   f"(reference {ref}); balance {format_amount(change.balance, acct.currency)}")
    for problem in problems:  # the credit stands: retrying would credit twice
        click.echo(f"prepaid: warning: {problem}; the credit stands, do not retry", err=True)


@main.command()
@click.argument("account_id")
@json_option
@pass_ctx
def balance(obj: Context, account_id: str, as_json: bool) -> None:
    """Print the balance and the credit available for new calls."""
    acct = obj.run(lambda st: st.ledger.get(account_id))
    if as_json:
        _emit({"account": acct.id, "currency": acct.currency,
               "balance": format_amount(acct.balance), "held": format_amount(acct.held),
               "available": format_amount(acct.available)})
        return
    line = f"{acct.id}: {format_amount(acct.balance, acct.currency)}"
    if acct.held:
        line += (f" ({format_amount(acct.held, acct.currency)} held for live calls, "
                 f"{format_amount(acct.available, acct.currency)} available)")
    click.echo(line)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m" if whole >= 3600 else \
        f"{whole // 60}m{whole % 60:02d}s"


@main.command("holds", context_settings={"ignore_unknown_options": False})
@click.argument("words", nargs=-1, required=True, metavar="ACCOUNT_ID | release ACCOUNT_ID REF")
@click.option("--force", is_flag=True,
              help="Release the hold of a call whose record says it is still live.")
@json_option
@pass_ctx
def holds_cmd(obj: Context, words: tuple[str, ...], force: bool, as_json: bool) -> None:
    """List ACCOUNT_ID's holds (ref, amount, age, owning server), or give one back:
    `prepaid holds release ACCOUNT_ID REF` (REF: the call's reference or the hold id), once,
    with an entry in the history. The metering listener gives back by itself the holds of
    calls gone from its server; release by hand only a hold no listener will settle. The
    hold of a live call (its record authorized or answered) is refused without --force."""
    if words[0] == "release" and len(words) == 3:
        _release_hold(obj, words[1], words[2], as_json, force=force)
        return
    if force:
        raise click.UsageError("--force goes with release ACCOUNT_ID REF")
    if len(words) != 1:
        raise click.UsageError("give ACCOUNT_ID, or release ACCOUNT_ID REF")
    account_id = words[0]

    async def body(st: Store) -> tuple[Account, list[holds.HoldInfo]]:
        return await st.ledger.get(account_id), await holds.list_holds(st.ledger, account_id)
    acct, found = obj.run(body)
    if as_json:
        _emit([{**h.to_json(), "amount": format_amount(h.amount)} for h in found])
        return
    table = Table("ref", "amount", "age", "owner", "state", "channel",
                  title=f"holds of account {acct.id}")
    for h in found:
        table.add_row(h.ref or h.hold, format_amount(h.amount, acct.currency), _age(h.age),
                      h.owner or "-", h.state or "no record", h.channel or "-")
    console.print(table)


def _release_hold(obj: Context, account_id: str, ref: str, as_json: bool, *,
                  force: bool) -> None:
    async def body(st: Store) -> tuple[Account, Change]:
        change = await holds.release(st.ledger, account_id, ref, why="released by the admin",
                                     force=force)
        return await st.ledger.get(account_id), change
    acct, change = obj.run(body)
    if as_json:
        _emit({"account": acct.id, "hold": ref, "duplicate": change.duplicate,
               "released": format_amount(change.hold_amount),
               "available": format_amount(acct.available)})
        return
    if change.duplicate:
        click.echo(f"hold {ref} of {acct.id} was released before; "
                   f"{format_amount(acct.available, acct.currency)} available now")
        return
    click.echo(f"released {format_amount(change.hold_amount, acct.currency)} held by {ref} "
               f"on {acct.id}; {format_amount(acct.available, acct.currency)} available")


# -- rates ------------------------------------------------------------------
@main.group()
def rates() -> None:
    """Import and query the rate decks, one per plan."""


def _plan(obj: Context, plan: str | None) -> str:
    return check_plan(plan or obj.settings.billing.default_plan)


@rates.command("import")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@plan_option
@click.option("--currency", default=None,
              help="The deck's ISO 4217 code (default: the plan's, else [billing] currency).")
@click.option("--dry-run", is_flag=True,
              help="Check FILE and show what would change; import nothing.")
@json_option
@pass_ctx
def rates_import(obj: Context, file: Path | None, plan: str | None, currency: str | None,
                 dry_run: bool, as_json: bool) -> None:
    """Replace PLAN's rate deck with FILE (default: [billing] rates). All or nothing.

    The file is streamed (memory does not grow with it) into a new deck version, which
    replaces the plan's active one in one step once every row is good. A new PLAN is made
    by its first import. The deck's currency must be that of every account on the plan."""
    plan = _plan(obj, plan)
    cur = check_currency(currency.upper()) if currency is not None else None
    path = file or obj.settings.billing.rates
    if path is None:
        raise click.UsageError("give FILE or set [billing] rates in the config")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise RateError(f"{path}: cannot read rate deck: {exc.strerror}") from None
    err = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                  TextColumn("{task.fields[rows]} rows"), TimeRemainingColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(f"reading {path.name}", total=size or 1, rows=0)
        rows = iter_csv(read_lines(path, lambda n: bar.advance(task, n)), str(path))

        async def body(st: Store) -> ImportReport:
            deck_cur = cur or await st.rates.plan_currency(plan) or st.settings.billing.currency
            await plans.check_import(st, plan, deck_cur)
            return await st.rates.load(rows, plan=plan, currency=deck_cur, dry_run=dry_run,
                                       progress=lambda n: bar.update(task, rows=n))

        report = obj.run(body)
    if as_json:
        _emit({"file": str(path), "plan": plan, "currency": report.currency,
               "dry_run": dry_run, "version": report.version or None,
               "rates": report.rows, "added": report.added, "changed": report.changed,
               "removed": report.removed, "unchanged": report.unchanged,
               "examples": report.examples})
        return
    counts = (f"{report.added} added, {report.changed} changed, {report.removed} removed, "
              f"{report.unchanged} unchanged")
    if not dry_run:
        click.echo(f"imported {report.rows} rates from {path} into plan {plan} "
                   f"({report.currency}, deck version {report.version}): {counts}")
        return
    click.echo(f"dry run: {path} holds {report.rows} good rates; importing it into plan "
               f"{plan} ({report.currency}): {counts}; nothing imported")
    for kind, examples in report.examples.items():
        for example in examples:
            click.echo(f"  {kind:<8} {example}")


@rates.command("export")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@plan_option
@pass_ctx
def rates_export(obj: Context, file: Path | None, plan: str | None) -> None:
    """Write PLAN's active deck as CSV to FILE (default: standard output).

    The CSV is the import format: 'prepaid rates import' reads it back unchanged. Rows come
    in no particular order; a file is written whole or not at all."""
    plan = _plan(obj, plan)

    async def body(st: Store, out: TextIO) -> int:
        rates = aiter(st.rates.scan(plan))
        first = await anext(rates, None)  # no deck: the error, and no header before it
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        n = 0
        if first is not None:
            writer.writerow(rate_row(first))
            n += 1
        async for rate in rates:
            writer.writerow(rate_row(rate))
            n += 1
        return n

    if file is None or str(file) == "-":
        obj.run(lambda st: body(st, sys.stdout))
        return
    part = file.with_name(f".{file.name}.part")
    try:
        with part.open("w", encoding="utf-8", newline="") as out:
            n = obj.run(lambda st: body(st, out))
        part.replace(file)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise RateError(f"{file}: cannot write: {exc.strerror}") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    click.echo(f"exported {n} rates to {file}", err=True)


def _rate_json(rate: Rate) -> dict[str, Any]:
    return {"prefix": rate.prefix, "name": rate.name,
            "price_per_minute": format_amount(rate.per_minute),
            "connect_fee": format_amount(rate.connect_fee),
            "initial_increment": rate.initial, "increment": rate.increment,
            "minimum_duration": rate.minimum}


@rates.command("lookup")
@click.argument("number")
@click.option("--file", type=click.Path(dir_okay=False, path_type=Path),
              help="Look up in this CSV instead of the imported deck.")
@plan_option
@json_option
@pass_ctx
def rates_lookup(obj: Context, number: str, file: Path | None, plan: str | None,
                 as_json: bool) -> None:
    """Show the rate NUMBER matches in PLAN's deck and what calls to it cost."""
    s = obj.settings
    norm = s.billing.normalisation
    plan = _plan(obj, plan)
    if file:
        quote = Quote(load_csv(file).lookup(number, norm), s.billing.currency, plan)
    else:
        quote = obj.run(lambda st: st.rates.quote(number, norm, plan))
    rate, cur = quote.rate, quote.currency
    costs = [(d, billed_seconds(rate, d), cost(rate, d)) for d in LOOKUP_DURATIONS]
    if as_json:
        _emit({"number": number, "normalised": s.billing.normalisation.normalise(number),
               "plan": None if file else plan, "currency": cur, "rate": _rate_json(rate),
               "costs": [{"seconds": d, "billed_seconds": b, "cost": format_amount(c)}
                         for d, b, c in costs]})
        return
    click.echo(f"{number} -> prefix {rate.prefix} {rate.name}: "
               f"{format_amount(rate.per_minute, cur)}/min, connect "
               f"{format_amount(rate.connect_fee, cur)}, billing {rate.initial}/{rate.increment}"
               + (f", minimum {rate.minimum}s" if rate.minimum else ""))
    table = Table("call length", "billed", "cost")
    for d, b, c in costs:
        table.add_row(f"{d} s", f"{b} s", format_amount(c, cur))
    console.print(table)


@rates.command("plans")
@json_option
@pass_ctx
def rates_plans(obj: Context, as_json: bool) -> None:
    """List the plans with a deck: currency, active deck version and number of rates."""
    found = obj.run(lambda st: st.rates.plans())
    if as_json:
        _emit([{"plan": p.plan, "currency": p.currency, "version": p.version,
                "rates": p.rates} for p in found])
        return
    table = Table("plan", "currency", "version", "rates")
    for p in found:
        table.add_row(p.plan, p.currency, str(p.version), str(p.rates))
    console.print(table)


# -- services ---------------------------------------------------------------
def _status_json(rep: health.Report) -> dict[str, Any]:
    def check(c: health.Check) -> dict[str, Any]:
        return {"state": c.state, "detail": c.detail}

    return {
        "ok": rep.ok, "redis": check(rep.redis),
        "metering": [{"system_name": b.system_name, "state": b.state, "backlog": b.backlog,
                      "at": b.at or None, "age_seconds": round(b.age, 3) if b.at else None,
                      "ok": v.ok, "why": v.why, "this_server": b.system_name == rep.this_server}
                     for b, v in rep.meters],
        **{c.name: check(c) for c in rep.others},
    }


@main.command()
@json_option
@pass_ctx
def status(obj: Context, as_json: bool) -> None:
    """Health of every dependency: Redis, each server's metering, SMTP, the payment gateway.

    Exit status 0 when calls can be authorized and billed here (Redis answers and this
    server's metering is up), 1 otherwise."""
    settings = obj.settings

    async def go() -> health.Report:
        store = await open_store(settings, check=False)
        try:
            return await health.report(store.redis, settings)
        finally:
            await store.close()

    rep = asyncio.run(go())
    if as_json:
        _emit(_status_json(rep))
    else:
        rows = [("redis", rep.redis.state, rep.redis.detail)]
        for b, v in rep.meters:
            mine = b.system_name == rep.this_server
            effect = ""
            if mine and not v.ok:
                effect = ("; calls allowed UNBILLED (allow_unmetered)"
                          if settings.agi.allow_unmetered else
                          "; new calls refused (ERROR NO_METERING)")
            rows.append((f"metering {b.system_name or '-'}" + (" (this server)" if mine else ""),
                         b.state, v.why + effect))
        rows += [(c.name, c.state, c.detail) for c in rep.others]
        width = max(len(r[0]) for r in rows)
        for name, state, detail in rows:  # plain lines: no wrapping, easy to grep
            click.echo(f"{name:<{width}}  {state:<8} {detail}")
    if not rep.ok:
        sys.exit(1)


@main.command()
@click.option("--only", type=click.Choice(["agi", "ami", "policy", "web"]), multiple=True,
              help="Run only these services (default: all; web when [web] listen is set).")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@pass_ctx
def serve(obj: Context, only: tuple[str, ...], log_level: str) -> None:
    """Run the FastAGI server, the AMI listener, the policy worker and the web page."""
    serve_forever(obj.settings, only or default_services(obj.settings), log_level)


account.add_command(lifecycle.account_set)
account.add_command(lifecycle.account_close)
# Commands that live beside the services they belong to.
for _command in (policy_cmd, card_group, sounds, *ops.COMMANDS, *reports.COMMANDS):
    main.add_command(_command)
main.add_command(verify_cmd)
main.add_command(dead_letters)
main.add_command(requests_cmd)
main.add_command(web_admin)
main.add_command(archive_cmd)
