"""Corrections from the shell against a real Redis: prepaid adjust, refund and reverse."""

from __future__ import annotations

import asyncio
import getpass
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from ami_listener.meter import Meter
from ami_listener.runners import replay
from prepaid.ledger import Ledger
from prepaid.store import Store
from testbed.ami_peer import FIXTURES, PER_SECOND, authorize, load, open_account
from tests.conftest import Run, cli
from tests.test_bad_input import refused
from tests.test_policy_support import Smtp, mailer, new_account, smtp, store, worker

__all__ = ["smtp", "store"]  # fixtures


def snapshot(url: str) -> dict[bytes, Any]:
    """Every key of the Redis and its contents: equal means nothing changed."""
    r: Any = redis.Redis.from_url(url)
    read: dict[bytes, Callable[[bytes], Any]] = {
        b"string": r.get, b"hash": r.hgetall, b"set": r.smembers,
        b"list": lambda k: r.lrange(k, 0, -1),
        b"zset": lambda k: r.zrange(k, 0, -1, withscores=True),
        b"stream": lambda k: r.xrange(k)}
    try:
        names: list[bytes] = sorted(r.keys("*"))
        return {k: read[r.type(k)](k) for k in names}
    finally:
        r.close()


def history(run: Run, account: str = "1001") -> list[dict[str, Any]]:
    out = run("history", account, "--json")
    assert out.exit_code == 0, out.output
    data: list[dict[str, Any]] = json.loads(out.stdout)
    return data


def balance(run: Run, account: str = "1001") -> str:
    value: str = json.loads(run("balance", account, "--json").stdout)["balance"]
    return value


def test_adjust_both_ways_once_per_reference_with_operator_and_reason(run: Run) -> None:
    run("account", "create", "1001")
    run("topup", "1001", "10", "--reference", "inv-1")
    r = run("adjust", "1001", "2.50", "--reason", "goodwill", "--reference", "adj-1")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == (f"adjusted by EUR 2.50 on 1001 by {getpass.getuser()} "
                                "(goodwill); balance EUR 12.50")
    r = run("adjust", "1001", "-4", "--reason", "double top-up", "--operator", "ann",
            "--json")
    data = json.loads(r.stdout)
    assert (data["kind"], data["amount"], data["balance"], data["operator"], data["reason"],
            data["duplicate"]) == ("adjust", "-4.00", "8.50", "ann", "double top-up", False)
    again = run("adjust", "1001", "2.50", "--reason", "goodwill", "--reference", "adj-1")
    assert again.exit_code == 0
    assert "correction adj-1 was already applied to 1001 (applied earlier, nothing changed)" \
        in again.stdout and "balance now EUR 8.50" in again.stdout
    rows = history(run)
    assert [(h["kind"], h["amount"], h["operator"], h["reason"]) for h in rows[:2]] == [
        ("adjust", "-4.00", "ann", "double top-up"),
        ("adjust", "2.50", getpass.getuser(), "goodwill")]
    assert rows[1]["reference"] == "adj-1" and rows[0]["reference"].startswith("adjust-")
    assert len(rows) == 4 and balance(run) == "8.50"


def test_a_negative_adjust_below_zero_needs_force(run: Run, redis_url: str) -> None:
    run("account", "create", "1001")
    run("topup", "1001", "3", "--reference", "inv-1")
    before = snapshot(redis_url)
    refused(run("adjust", "1001", "-5", "--reason", "chargeback"), "below zero", "--force",
            "prepaid: error:")
    assert snapshot(redis_url) == before
    r = run("adjust", "1001", "-5", "--reason", "chargeback", "--force")
    assert r.exit_code == 0 and "balance EUR -2.00" in r.stdout
    assert balance(run) == "-2.00"


def test_refund_takes_a_top_up_back_once(run: Run, redis_url: str) -> None:
    run("account", "create", "1001")
    run("account", "create", "1002")
    run("topup", "1001", "10", "--reference", "inv-7")
    run("topup", "1002", "1", "--reference", "inv-8")
    r = run("refund", "inv-7", "--operator", "bob", "--reason", "paid twice")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == ("refunded top-up inv-7: EUR -10.00 on 1001 by bob (paid twice);"
                                " balance EUR 0.00")
    before = snapshot(redis_url)
    again = run("refund", "inv-7", "--json")
    assert again.exit_code == 0
    assert json.loads(again.stdout)["duplicate"] is True
    assert "already refunded" in run("refund", "inv-7").stdout
    assert snapshot(redis_url) == before
    [entry] = [h for h in history(run) if h["kind"] == "refund"]
    assert (entry["amount"], entry["reference"], entry["operator"], entry["reason"]) == (
        "-10.00", "inv-7", "bob", "paid twice")
    assert balance(run, "1002") == "1.00"


def test_refund_of_spent_credit_needs_force_and_unknown_is_refused(run: Run,
                                                                   redis_url: str) -> None:
    run("account", "create", "1001")
    run("topup", "1001", "10", "--reference", "inv-1")
    run("adjust", "1001", "-6", "--reason", "spent")
    before = snapshot(redis_url)
    refused(run("refund", "inv-1"), "below zero", "--force")
    refused(run("refund", "inv-404"), "no top-up with reference 'inv-404'")
    refused(run("refund", "inv-1", "--account", "nobody"), "account 'nobody' does not exist")
    assert snapshot(redis_url) == before
    assert run("refund", "inv-1", "--force").exit_code == 0
    assert balance(run) == "-6.00"


async def test_reverse_gives_back_a_metered_call_once(ledger: Ledger, run: Run,
                                                      redis_url: str) -> None:
    rec = load(FIXTURES / "shared" / "answered-caller-hangs-up.ami")
    await open_account(ledger, 10_000_000)
    await authorize(ledger, rec.ref, rec.channel, rec.number, PER_SECOND)
    before = snapshot(redis_url)
    live = await asyncio.to_thread(run, "reverse", rec.ref)  # authorized: its hold is up
    refused(live, "is live or not yet settled")
    assert snapshot(redis_url) == before
    await replay(Meter(ledger), rec.messages)
    assert (await ledger.get("alice")).balance == 10_000_000 - 90_000  # 0.05 + 4 x 0.01
    r = await asyncio.to_thread(run, "reverse", rec.ref, "--reason", "dropped call", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert (data["account"], data["amount"], data["balance"], data["kind"]) == (
        "alice", "0.09", "10.00", "reverse")
    again = await asyncio.to_thread(run, "reverse", rec.ref)
    assert "already reversed" in again.stdout
    assert (await ledger.get("alice")).balance == 10_000_000
    [entry] = [e for e in await ledger.history("alice", 50) if e.kind == "reverse"]
    assert (entry.amount, entry.ref, entry.reason) == (90_000, f"call {rec.ref}",
                                                       "dropped call")
    refused(await asyncio.to_thread(run, "reverse", "no-such-call"),
            "no call with reference 'no-such-call'")
    audit = await asyncio.to_thread(run, "verify")  # the reversal is no mismatch
    assert audit.exit_code == 0 and "clean" in audit.stdout, audit.output


async def test_negative_adjust_across_the_threshold_mails_the_warning(
        store: Store, smtp: Smtp, tmp_path: Path, redis_url: str) -> None:
    await new_account(store, action="email", token="")  # 10.00, warn below 5.00
    conf = tmp_path / "prepaid.toml"
    conf.write_text(f'[redis]\nurl = "{redis_url}"\n[smtp]\nhost = "127.0.0.1"\n'
                    f'port = {smtp.port}\nfrom = "billing@pbx.test"\n')
    r = await asyncio.to_thread(cli(conf), "adjust", "1001", "-6", "--reason", "chargeback")
    assert r.exit_code == 0, r.output
    assert await worker(store).process_batch() == 1
    assert await mailer(store).process_batch() == 1
    [msg] = smtp.messages
    assert msg["To"] == "ann@example.org"
    assert msg["Subject"] == "Your prepaid balance is low: EUR 4.00"


@pytest.mark.parametrize(("args", "words"), [
    (("adjust", "1001", "ten", "--reason", "x"), ("amount 'ten' is not a number",)),
    (("adjust", "1001", "-1.005", "--reason", "x"), ("amount '-1.005' has 3 decimals",)),
    (("adjust", "1001", "0", "--reason", "x"), ("amount '0' is zero",)),
    (("adjust", "1001", "-0", "--reason", "x"), ("amount '-0' is zero",)),
    (("adjust", "1001", "5", "--reason", " "), ("--reason is empty",)),
    (("adjust", "1001", "5", "--reason", "a\nb"), ("--reason", "control character")),
    (("adjust", "1001", "5"), ("--reason",)),
    (("adjust", "nobody", "5", "--reason", "x"), ("account 'nobody' does not exist",)),
    (("adjust", "bad id", "5", "--reason", "x"), ("account id 'bad id'",)),
    (("adjust", "1001", "5", "--reason", "x", "--operator", ""), ("--operator is empty",)),
    (("adjust", "1001", "5", "--reason", "x", "--reference", "4242424242424242"),
     ("looks like a card number",)),
    (("refund", "bad\nref"), ("REFERENCE",)),
    (("reverse", "bad\nref"), ("REFERENCE",)),
])
def test_bad_corrections_are_one_line_and_change_nothing(run: Run, redis_url: str,
                                                         args: tuple[str, ...],
                                                         words: tuple[str, ...]) -> None:
    run("account", "create", "1001")
    run("topup", "1001", "5", "--reference", "seed")
    before = snapshot(redis_url)
    refused(run(*args), "prepaid: error:", *words)
    assert snapshot(redis_url) == before
