"""Support requests: a top-up larger than the presets, asked for on the web page.

A request is an entry of the stream ``<prefix>:support`` and an e-mail to
``[web] support_email``.  The admin approves it with the existing manual top-up, above
``[policy] max_topup`` with ``--override``, under the request's own reference:

    prepaid topup 1001 250.00 --override --reference support-1733150000000-0

The reference makes the credit happen at most once (ledger key ``topup:<reference>``);
``prepaid requests`` shows a request as credited once that key exists (in any of the
ledger's idempotency buckets), and remembers it in ``<prefix>:support:credited``, which
outlives the ledger's idempotency window.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from policy.mailer import MailQueue, Templates, compose
from policy.worker import mail_context
from prepaid import config as config_mod
from prepaid import keys
from prepaid.config import Settings
from prepaid.errors import InputError
from prepaid.ledger import Account
from prepaid.money import format_amount, parse_amount
from prepaid.redis_client import text
from prepaid.store import Store, open_store

MAX_NOTE = 500
KEEP = 10_000  # requests kept in the stream (about)


@dataclass(frozen=True, slots=True)
class Request:
    id: str
    account: str
    amount: int
    currency: str
    note: str
    time: float
    credited: bool = False

    @property
    def reference(self) -> str:
        return f"support-{self.id}"

    def command(self) -> str:
        return (f"prepaid topup {self.account} {format_amount(self.amount)} --override "
                f"--reference {self.reference}")


def check_note(note: str) -> str:
    note = " ".join(note.split())  # one line: no header or log injection
    if len(note) > MAX_NOTE:
        raise InputError(f"the note is longer than {MAX_NOTE} characters")
    return note


async def submit(store: Store, acct: Account, amount: str, note: str) -> Request:
    """Record the request and e-mail the admin; InputError for a bad amount or note."""
    micros = parse_amount(amount.strip(), decimals=store.settings.billing.decimals,
                          what="the amount")
    note = check_note(note)
    prefix = store.settings.redis.key_prefix
    now = time.time()
    entry = text(await store.redis.xadd(keys.support_requests(prefix), {
        "account": acct.id, "amount": str(micros), "currency": acct.currency, "note": note,
        "time": f"{now:.3f}"}, maxlen=KEEP, approximate=True))
    req = Request(entry, acct.id, micros, acct.currency, note, now)
    to = store.settings.web.support_email
    if to:
        mail_id = f"support:{entry}"
        ctx = mail_context(acct, amount=format_amount(micros, acct.currency),
                           reference=req.reference, reason=note or "(no note)",
                           advice=req.command())
        msg = compose(Templates(store.settings.smtp.templates), store.settings.smtp.sender, to,
                      "support_request", ctx, mail_id)
        await MailQueue(store.redis, prefix).enqueue(mail_id, msg)
    return req


async def requests(store: Store, limit: int = 50) -> list[Request]:
    """The newest requests first, each marked credited once its top-up was made."""
    prefix = store.settings.redis.key_prefix
    rows: Any = await store.redis.xrevrange(keys.support_requests(prefix), count=limit)
    seen_key = keys.support_credited(prefix)
    out = []
    for entry, fields in rows or []:
        f = {text(k): text(v) for k, v in (fields or {}).items()}
        req = Request(text(entry), f["account"], int(f["amount"]), f["currency"], f["note"],
                      float(f["time"]))
        credited = bool(await store.redis.hexists(seen_key, req.id))
        if not credited:
            key = f"topup:{req.reference}"
            buckets = [keys.account_part(prefix, req.account, "idem"),
                       *store.ledger.idempotency_buckets(req.account)]
            for bucket in buckets:
                if await store.redis.hexists(bucket, key):
                    credited = True
                    await store.redis.hset(seen_key, req.id, f"{time.time():.3f}")
                    break
        out.append(Request(req.id, req.account, req.amount, req.currency, req.note, req.time,
                           credited))
    return out


def _settings() -> Settings:
    obj: Any = click.get_current_context().find_root().obj
    settings = getattr(obj, "settings", None)
    return settings if isinstance(settings, Settings) else config_mod.load()


@click.command("requests")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--open", "only_open", is_flag=True, help="Only those not credited yet.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def requests_cmd(limit: int, only_open: bool, as_json: bool) -> None:
    """Support requests from the web page (larger top-ups), newest first, with the command
    that approves each."""
    async def go() -> list[Request]:
        store = await open_store(_settings())
        try:
            return await requests(store, limit)
        finally:
            await store.close()
    found = asyncio.run(go())  # a PrepaidError: the CLI's one line, exit status 1
    found = [r for r in found if not (only_open and r.credited)]
    if as_json:
        click.echo(json.dumps([{"id": r.id, "account": r.account, "currency": r.currency,
                                "amount": format_amount(r.amount), "note": r.note,
                                "time": r.time, "reference": r.reference,
                                "credited": r.credited, "approve": r.command()}
                               for r in found], indent=2, sort_keys=True))
        return
    if not found:
        click.echo("no support requests")
        return
    table = Table("time", "account", "amount", "note", "state", "approve with")
    for r in found:
        table.add_row(time.strftime("%Y-%m-%d %H:%M", time.localtime(r.time)), r.account,
                      format_amount(r.amount, r.currency), r.note,
                      "credited" if r.credited else "open",
                      "" if r.credited else r.command())
    Console(highlight=False, width=200).print(table)
