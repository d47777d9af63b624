"""``prepaid dead-letters``: the events parked after failing again and again
(prepaid/deadletters.py), listed, put back into their stream after a fix, or dropped."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import click
from rich.console import Console
from rich.table import Table

from prepaid.config import Settings
from prepaid.deadletters import DeadLetter, DeadLetters, check_id
from prepaid.errors import InputError
from prepaid.store import Store

T = TypeVar("T")


class Context(Protocol):
    """What shell.cli's Context gives a command: the settings and a run on the store."""

    @property
    def settings(self) -> Settings: ...

    def run(self, body: Callable[[Store], Awaitable[T]]) -> T: ...

console = Console(highlight=False)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _letters(store: Store) -> DeadLetters:
    return DeadLetters(store.redis, store.settings.redis.key_prefix)


def _emit(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


@click.group("dead-letters", invoke_without_command=True)
@json_option
@click.pass_context
def dead_letters(ctx: click.Context, as_json: bool) -> None:
    """Events that failed [policy] dead_letter_after times: list them (the default), retry
    them after a fix, or drop them."""
    if ctx.invoked_subcommand is not None:
        return
    obj: Context = ctx.obj

    async def body(st: Store) -> list[DeadLetter]:
        return await _letters(st).list()

    letters = obj.run(body)
    if as_json:
        _emit([x.as_json() for x in letters])
        return
    if not letters:
        click.echo("no dead letters")
        return
    table = Table("id", "stream", "event", "account", "attempts", "parked", "error")
    prefix = f"{obj.settings.redis.key_prefix}:"
    for x in letters:
        table.add_row(x.id, x.stream.removeprefix(prefix), x.source_id, x.account or "-",
                      str(x.attempts), _when(x.at), x.error)
    console.print(table)


@dead_letters.command("retry")
@click.argument("letter_id", required=False)
@click.option("--all", "every", is_flag=True, help="Every dead letter.")
@json_option
@click.pass_obj
def retry(obj: Context, letter_id: str | None, every: bool, as_json: bool) -> None:
    """Put LETTER_ID (or --all) back into its stream, to be handled again; once fixed."""
    if every == (letter_id is not None):
        raise InputError("give one dead letter id or --all ('prepaid dead-letters' lists them)")
    if letter_id is not None:
        check_id(letter_id)

    async def body(st: Store) -> list[tuple[DeadLetter, str]]:
        letters = _letters(st)
        chosen = await letters.list() if every else [await letters.get(letter_id or "")]
        return [(x, await letters.retry(x)) for x in chosen]

    done = obj.run(body)
    if as_json:
        _emit([{"id": x.id, "stream": x.stream, "source_id": x.source_id, "new_id": new}
               for x, new in done])
        return
    if not done:
        click.echo("no dead letters")
    for x, new in done:
        click.echo(f"dead letter {x.id} put back into {x.stream} as {new}")


@dead_letters.command("drop")
@click.argument("letter_id")
@json_option
@click.pass_obj
def drop(obj: Context, letter_id: str, as_json: bool) -> None:
    """Remove LETTER_ID for good (its event is never handled)."""
    check_id(letter_id)

    async def body(st: Store) -> DeadLetter:
        letters = _letters(st)
        letter = await letters.get(letter_id)
        await letters.drop(letter)
        return letter

    x = obj.run(body)
    if as_json:
        _emit({"dropped": x.as_json()})
        return
    click.echo(f"dead letter {x.id} ({x.stream} event {x.source_id}) dropped")
