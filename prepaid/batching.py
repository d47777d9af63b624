"""Automatic pipelining: the Redis calls made in one turn of the event loop, by every caller
of one client, go to Redis in one round trip.

The meter pays the blocks of every live call at each tick, and FastAGI authorizes every call
being set up, side by side: sent one by one, the client's own cost per command (a write, a
wake-up, a read) is what limits them. The first caller of a turn leads: it yields once so
the others can join, then sends every queued call in one pipeline (no transaction: each
command and script is atomic alone, as before) and hands each caller its own reply or
error. No task is started. A group of calls (``commands``) stays together and in order.
A Cluster client sends each call alone (its pipelines do not carry scripts).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript

from prepaid.redis_client import RedisClient

MAX_BATCH = 256  # calls in one pipeline; a larger turn sends several


@dataclass(frozen=True, slots=True)
class Call:
    """One command (``script`` None) or one script run, with its arguments."""

    name: str
    args: Sequence[Any]
    script: AsyncScript | None = None
    keys: Sequence[str] = ()


Entry = tuple[list[Call], "asyncio.Future[list[Any]]"]


class Batcher:
    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self.enabled = not hasattr(client, "get_node")  # not a RedisCluster
        self._queue: list[Entry] = []
        self._scripts: dict[str, AsyncScript] = {}
        self.batches = 0  # round trips made (for the tests and the benchmark)

    def script_for(self, source: str) -> AsyncScript:
        """The client's registered script of ``source`` (its SHA1 computed once)."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client.register_script(source)
        return script

    async def command(self, name: str, *args: Any) -> Any:
        return (await self.commands([Call(name, args)]))[0]

    async def script(self, script: AsyncScript | str, keys: Sequence[str],
                     args: Sequence[Any]) -> Any:
        if isinstance(script, str):
            script = self.script_for(script)
        return (await self.commands([Call("EVALSHA", args, script, keys)]))[0]

    async def commands(self, calls: list[Call]) -> list[Any]:
        """The replies of ``calls``, sent together and in order; the first error raises."""
        if not self.enabled:
            return [await self._direct(c) for c in calls]
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((calls, fut))
        if len(self._queue) == 1:
            await self._lead()
        replies = await fut
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def _direct(self, call: Call) -> Any:
        if call.script is not None:
            return await call.script(keys=call.keys, args=call.args)
        return await self.client.execute_command(call.name, *call.args)

    async def _lead(self) -> None:
        try:
            await asyncio.sleep(0)  # the turn's other callers queue behind this one
        finally:
            # Even when this caller is cancelled, the others' calls are sent.
            batch, self._queue = self._queue, []
            await self._send(batch)

    async def _send(self, batch: list[Entry]) -> None:
        start = 0
        while start < len(batch):
            part: list[Entry] = []
            size = 0
            while start < len(batch) and (not part or size + len(batch[start][0]) <= MAX_BATCH):
                part.append(batch[start])
                size += len(batch[start][0])
                start += 1
            try:
                replies = await self._round_trip([c for calls, _ in part for c in calls])
            except asyncio.CancelledError:
                for _, fut in batch:
                    if not fut.done():
                        fut.cancel()
                raise
            except Exception as exc:  # the link failed: every caller hears it
                replies = [exc] * size
            self.batches += 1
            at = 0
            for calls, fut in part:
                if not fut.done():
                    fut.set_result(replies[at:at + len(calls)])
                at += len(calls)

    async def _round_trip(self, calls: list[Call]) -> list[Any]:
        if len(calls) == 1:
            return [await self._direct(calls[0])]
        pipe = self.client.pipeline(transaction=False)
        assert isinstance(pipe, Pipeline)
        async with pipe:
            for call in calls:
                if call.script is not None:
                    await call.script(keys=call.keys, args=call.args, client=pipe)
                else:
                    pipe.execute_command(call.name, *call.args)
            return list(await pipe.execute(raise_on_error=False))


_BATCHERS: weakref.WeakKeyDictionary[Any, Batcher] = weakref.WeakKeyDictionary()


def of(client: RedisClient) -> Batcher:
    """The one batcher of ``client``: every module's calls on it share round trips."""
    batcher = _BATCHERS.get(client)
    if batcher is None:
        batcher = _BATCHERS[client] = Batcher(client)
    return batcher
