"""Fixtures and helpers of the fault suite: settings, an admin's CLI, log counting, a cuttable
AMI relay, an AMI peer with a backlog, and re-timed recordings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from ami_listener.protocol import Message, timestamp_us
from prepaid.config import Settings, parse
from shell.cli import main
from testbed.ami_peer import AmiPeer, wire
from testbed.servers import free_port

US = 1_000_000
EUR = 1_000_000


def settings(redis_url: str, **sections: dict[str, Any]) -> Settings:
    """Settings as a config file would give them (through the real parser)."""
    data: dict[str, dict[str, Any]] = {"redis": {"url": redis_url, "timeout": 0.5}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse(data, "<fault test>", env={})


def cli(redis_url: str, tmp_path: Path, *args: str) -> Result:
    """The ``prepaid`` command as the admin runs it, with a config file naming this Redis."""
    conf = tmp_path / "prepaid.toml"
    conf.write_text(f'[redis]\nurl = "{redis_url}"\n[billing]\ncurrency = "EUR"\n')
    return CliRunner().invoke(main, ["--config", str(conf), *args], catch_exceptions=False)


async def cli_async(redis_url: str, tmp_path: Path, *args: str) -> Result:
    """The CLI runs its own event loop: run it in a thread from an async test."""
    return await asyncio.to_thread(cli, redis_url, tmp_path, *args)


def lines(caplog: pytest.LogCaptureFixture, text: str, *, logger: str = "",
          level: int = logging.DEBUG) -> list[str]:
    """The log messages at ``level`` or above from ``logger`` (a prefix) containing ``text``."""
    return [r.getMessage() for r in caplog.records
            if r.levelno >= level and r.name.startswith(logger) and text in r.getMessage()]


# -- AMI: a link that can be cut, and re-timed recordings --------------------------------

class AmiRelay:
    """A TCP relay between the listener and the AMI peer that the test cuts and restores.

    A cut is a black hole, as when a network path dies: the connections stay open but
    nothing gets through either way (no FIN, no RST), so the listener must notice by itself
    (its Pings go unanswered) and what Asterisk sends meanwhile is lost; new connections are
    refused.  Restoring closes the dead connections (Asterisk has dropped the session) and
    accepts new ones on the same port.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._live: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._dead: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._pipes: set[asyncio.Task[None]] = set()
        self.dropped = 0  # bytes lost in the black hole

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        pair = (writer, up_writer)
        self._live.append(pair)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst, pair))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                if pair in self._dead:
                    self.dropped += len(data)
                    continue
                dst.write(data)
                await dst.drain()
        if pair not in self._dead:  # a black-holed path carries no FIN either
            dst.close()

    async def cut(self) -> None:
        self._dead += self._live
        self._live = []
        if self._server is not None:
            self._server.close()  # new connections are refused
            self._server = None

    async def restore(self) -> None:
        for pair in self._dead:
            for w in pair:
                w.close()
        self._dead = []
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def stop(self) -> None:
        await self.cut()
        await self.restore()
        assert self._server is not None
        self._server.close()
        self._server = None
        for pair in self._live:
            for w in pair:
                w.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)


class BacklogPeer(AmiPeer):
    """An AMI peer that, when asked for the channel list, first sends what it has in
    ``backlog`` (events Asterisk posted just as the link came back, e.g. a late Cdr)."""

    def __init__(self) -> None:
        super().__init__()
        self.backlog: list[Message] = []

    async def _answer(self, msg: Message, writer: asyncio.StreamWriter) -> None:
        if msg.get("Action", "").lower() == "coreshowchannels" and self.backlog:
            self.learn(self.backlog)
            for event in self.backlog:
                writer.write(wire(event))
            self.backlog = []
        await super()._answer(msg, writer)


def stamp(us: int) -> str:
    return f"{us // US}.{us % US:06d}"


def retime(msgs: Iterable[Message], shift_us: int) -> list[Message]:
    """The same events ``shift_us`` later (copies; a Cdr's seconds are left as they are)."""
    out = []
    for m in msgs:
        copy = Message(m.items())
        copy.extra = list(m.extra)
        at = timestamp_us(m["Timestamp"]) if "Timestamp" in m else None
        if at is not None:
            copy["Timestamp"] = stamp(at + shift_us)
        out.append(copy)
    return out


def with_billsec(msg: Message, seconds: int) -> Message:
    """A Cdr event whose call lasted ``seconds`` longer than recorded."""
    copy = Message(msg.items())
    copy.extra = list(msg.extra)
    for name in ("Duration", "BillableSeconds"):
        copy[name] = str(int(msg[name]) + seconds)
    return copy

