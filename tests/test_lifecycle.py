"""An account's lifecycle from the shell against a real Redis: set, suspend, resume, close;
and one error style across every command."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest

from agi.server import AgiServer
from prepaid.store import Store
from shell.cli import main
from testbed.agi_peer import DENY_TAIL, AgiPeer, agi_env, variable_commands
from tests.conftest import Run
from tests.test_agi_fastagi import EUR, account, agi
from tests.test_bad_input import refused
from tests.test_corrections import balance, history, snapshot

__all__ = ["agi"]  # fixtures


def shown(run: Run, account_id: str = "1001") -> dict[str, Any]:
    out = run("account", "show", account_id, "--json")
    assert out.exit_code == 0, out.output
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def test_set_changes_email_name_and_note(run: Run) -> None:
    run("account", "create", "1001", "--email", "a@example.org")
    r = run("account", "set", "1001", "--email", "b@example.org", "--name", "Ann Lee",
            "--note", "VIP since 2019")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == ("account 1001: email 'b@example.org', name 'Ann Lee', "
                                "note 'VIP since 2019'")
    data = shown(run)
    assert (data["email"], data["name"], data["note"]) == ("b@example.org", "Ann Lee",
                                                           "VIP since 2019")
    text = run("account", "show", "1001").stdout
    assert "Ann Lee" in text and "VIP since 2019" in text
    data = json.loads(run("account", "set", "1001", "--note", "", "--json").stdout)
    assert (data["note"], data["name"]) == ("", "Ann Lee")


def test_suspend_keeps_its_reason_until_resumed_and_both_print_json(run: Run) -> None:
    run("account", "create", "1001")
    r = run("account", "suspend", "1001", "--reason", "unpaid invoice 42", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert (data["status"], data["status_reason"]) == ("suspended", "unpaid invoice 42")
    assert "suspended (unpaid invoice 42)" in run("account", "show", "1001").stdout
    data = json.loads(run("account", "resume", "1001", "--json").stdout)
    assert (data["status"], data["status_reason"]) == ("active", "")
    assert json.loads(run("account", "pin", "1001", "--clear", "--json").stdout) == {
        "account": "1001", "pin": "cleared"}


async def test_close_is_refused_with_a_balance_or_live_calls_unless_forced(
        agi: tuple[Store, AgiServer], run: Run, redis_url: str) -> None:
    store, server = agi
    await account(store, "1001", EUR)
    before = snapshot(redis_url)
    refused(await asyncio.to_thread(run, "account", "close", "1001"),
            "prepaid: error: account '1001' has a balance of 1.00", "--force")
    await store.ledger.reserve("1001", "call:r1", 100_000, key="rsv:r1")
    await asyncio.to_thread(run, "adjust", "1001", "-1", "--reason", "paid out in cash")
    before = snapshot(redis_url)
    refused(await asyncio.to_thread(run, "account", "close", "1001"),
            "account '1001' has 1 live call(s) holding credit", "--force")
    assert snapshot(redis_url) == before
    await store.ledger.release("1001", "call:r1", key="rel:r1")
    r = await asyncio.to_thread(run, "account", "close", "1001", "--reason", "moved away",
                                "--operator", "ann")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "account 1001 is closed by ann (moved away)"
    data = await asyncio.to_thread(shown, run)
    assert (data["status"], data["status_reason"]) == ("closed", "moved away")
    assert data["closed"] is not None
    # Authorization refuses it like a suspended account, and nothing is reserved.
    commands = await AgiPeer(agi_env("r9", "00491701234567")).call(server.port)
    assert commands[1:] == [*variable_commands("DENIED", "SUSPENDED", "1001", "r9", "0", ""),
                            *DENY_TAIL]
    assert await store.ledger.holds("1001") == {}


async def test_a_closed_account_keeps_its_history_and_its_id(agi: tuple[Store, AgiServer],
                                                             run: Run, redis_url: str) -> None:
    store, _ = agi
    await account(store, "1001", EUR)
    r = await asyncio.to_thread(run, "account", "close", "1001", "--force", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["closed_before"] is False
    # forced: the balance stays, for a refund or an adjust
    assert await asyncio.to_thread(balance, run) == "1.00"
    rows = await asyncio.to_thread(history, run)
    assert [h["kind"] for h in rows] == ["close", "credit", "open"]
    before = snapshot(redis_url)
    refused(await asyncio.to_thread(run, "account", "create", "1001"), "already exists")
    refused(await asyncio.to_thread(run, "topup", "1001", "5"), "account '1001' is closed")
    refused(await asyncio.to_thread(run, "account", "resume", "1001"), "account '1001' is closed")
    refused(await asyncio.to_thread(run, "account", "suspend", "1001", "--reason", "x"),
            "is closed")
    again = await asyncio.to_thread(run, "account", "close", "1001")
    assert again.exit_code == 0 and "was closed before (nothing changed)" in again.stdout
    assert snapshot(redis_url) == before
    r = await asyncio.to_thread(run, "adjust", "1001", "-1", "--reason", "closing balance")
    assert r.exit_code == 0 and await asyncio.to_thread(balance, run) == "0.00"
    audit = await asyncio.to_thread(run, "verify")  # the close entry is no mismatch
    assert audit.exit_code == 0 and "clean" in audit.stdout, audit.output


@pytest.mark.parametrize(("args", "words"), [
    (("account", "set", "1001"), ("give at least one of --email, --name, --note",)),
    (("account", "set", "1001", "--email", "a@b c"), ("--email",)),
    (("account", "set", "1001", "--name", "a\nb"), ("--name", "control character")),
    (("account", "set", "1001", "--note", "x" * 501), ("--note", "at most 500")),
    (("account", "set", "nobody", "--name", "x"), ("account 'nobody' does not exist",)),
    (("account", "suspend", "1001", "--bogus"),
     ("No such option '--bogus' (see 'prepaid account suspend -h')",)),
    (("account", "suspend", "1001", "--reason", ""), ("--reason is empty",)),
    (("account", "suspend", "nobody", "--reason", "x"), ("account 'nobody' does not exist",)),
    (("account", "resume", "bad id"), ("account id 'bad id'",)),
    (("account", "close", "nobody"), ("account 'nobody' does not exist",)),
    (("account", "close", "1001", "--reason", "a\rb"), ("--reason", "control character")),
])
def test_bad_lifecycle_input_is_one_line_and_changes_nothing(run: Run, redis_url: str,
                                                             args: tuple[str, ...],
                                                             words: tuple[str, ...]) -> None:
    run("account", "create", "1001", "--email", "a@example.org")
    run("topup", "1001", "5", "--reference", "seed")
    before = snapshot(redis_url)
    refused(run(*args), "prepaid: error:", *words)
    assert snapshot(redis_url) == before


def leaves(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from leaves(command, (*path, name))
        else:
            yield (*path, name)


COMMANDS = list(leaves(main))


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_command_reports_bad_input_in_one_style(run: Run, redis_url: str,
                                                      path: tuple[str, ...]) -> None:
    run("account", "create", "1001")
    before = snapshot(redis_url)
    refused(run(*path, "--no-such-option"), "prepaid: error: ")
    refused(run(*path, "bad id", "--no-such-option", "x"), "prepaid: error: ")
    assert snapshot(redis_url) == before


@pytest.mark.parametrize(("args", "words"), [
    # These printed click's "Error: ..." before.
    (("policy", "nobody"), ("account 'nobody' does not exist",)),
    (("policy", "1001", "--action", "bogus"), ("--action",)),
    (("card", "show", "nobody"), ("account 'nobody' does not exist",)),
    (("card", "set", "1001", "--token", "x"), ("Missing option",)),
    (("calls", "nobody"), ("account 'nobody' does not exist",)),
    (("calls", "1001", "--limit", "0"), ("--limit",)),
    (("holds", "1001", "x", "y"), ("give ACCOUNT_ID, or release ACCOUNT_ID REF",)),
    (("history", "1001", "--limit", "0"), ("--limit",)),
    (("account", "nosuch"), ("No such command 'nosuch'",)),
    (("nosuch",), ("No such command 'nosuch'",)),
])
def test_project_and_click_errors_share_the_style(run: Run, redis_url: str,
                                                  args: tuple[str, ...],
                                                  words: tuple[str, ...]) -> None:
    run("account", "create", "1001")
    before = snapshot(redis_url)
    refused(run(*args), "prepaid: error: ", *words)
    assert snapshot(redis_url) == before


def test_every_command_that_prints_data_takes_json() -> None:
    # serve runs the services; rates export prints the deck as CSV, its import format.
    missing = [" ".join(p) for p in COMMANDS if p not in (("serve",), ("rates", "export"))
               and not any(o.name == "as_json" for o in _command(p).params)]
    assert missing == []


def _command(path: tuple[str, ...]) -> click.Command:
    command: click.Command = main
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


def test_card_and_sounds_print_json(run: Run, tmp_path: Path) -> None:
    run("account", "create", "1001")
    r = run("card", "set", "1001", "--token", "tok_ok", "--brand", "visa", "--last4", "4242",
            "--exp", "12/30", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["card"] == {"brand": "visa", "last4": "4242", "exp": "12/30"}
    data = json.loads(run("card", "remove", "1001", "--json").stdout)
    assert (data["card"], data["switched_to_email"]) == (None, False)
    data = json.loads(run("sounds", "install", "--dir", str(tmp_path), "--json").stdout)
    assert data["dir"] == str(tmp_path / "prepaid") and data["prompts"]
    assert all(Path(f).is_file() for f in data["files"])
