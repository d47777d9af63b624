"""The product's AMI client with what tests, benchmarks and the demo watch a PBX by.

`Ami` wraps `ami_listener.client.AmiClient` (the one AMI client of the project): it logs in
for every event class, keeps every event it reads (`seen`), hands each one to `events` for
a consumer of its own, and waits for the first event that matches (`wait_event`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable

from ami_listener.client import AmiClient, AmiError
from ami_listener.protocol import Message

__all__ = ["Ami", "Message", "event"]

# The bed's clients watch for a few minutes at most; far more than one run's events.
QUEUE_SIZE = 1_000_000
ACTION_TIMEOUT = 10.0  # seconds for a response; a loaded 2-core bed answers slowly


class Ami:
    """A logged-in `AmiClient` and the reader task that drains it into `seen` and `events`."""

    def __init__(self, client: AmiClient) -> None:
        self.client = client
        self.events: asyncio.Queue[Message] = asyncio.Queue()
        self.seen: list[Message] = []
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def banner(self) -> str:
        return self.client.banner

    @classmethod
    async def connect(cls, port: int, username: str, secret: str, *,
                      host: str = "127.0.0.1") -> Ami:
        client = AmiClient(host, port, username, secret, events="on",
                           timeout=ACTION_TIMEOUT, queue_size=QUEUE_SIZE)
        await client.connect()
        ami = cls(client)
        ami._task = asyncio.create_task(ami._read_loop(), name=f"testbed-ami-{port}")
        ami._task.add_done_callback(lambda _: ami._arrived.set())  # wakes wait_event
        return ami

    async def _read_loop(self) -> None:
        while True:
            msg = await self.client.read(3600.0)
            if msg is None:
                continue
            self.seen.append(msg)
            self.events.put_nowait(msg)
            self._arrived.set()

    async def action(self, name: str, **fields: str) -> Message:
        """Send an action and return its response (AmiError if none within the time-out)."""
        return await self.client.action(name, **fields)

    async def wait_event(self, match: Callable[[Message], bool],
                         within: float = 10) -> Message:
        """The first event (already seen or coming) for which `match` is true; TimeoutError
        after `within` seconds, AmiError as soon as the link is gone."""
        checked = 0
        try:
            async with asyncio.timeout(within):
                while True:
                    for msg in self.seen[checked:]:
                        if match(msg):
                            return msg
                    checked = len(self.seen)
                    if self._task is not None and self._task.done():
                        self._task.result()  # raises why the link went
                        raise AmiError(f"AMI link to {self.client.where} was closed")
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise TimeoutError(f"no matching AMI event within {within:g} s") from None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.client.close()


def event(name: str, **fields: str) -> Callable[[Message], bool]:
    """A match for `wait_event`: event `name` whose fields match these regular expressions."""

    def match(msg: Message) -> bool:
        return msg.get("Event") == name and all(
            re.search(v, msg.get(k, "")) for k, v in fields.items()
        )

    return match
