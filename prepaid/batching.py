"""Automatic pipelining of one Lua script: the calls made in one turn of the event loop go
to Redis in one round trip.

The meter pays the blocks of every live call at each tick, and FastAGI reserves for every
call being set up, side by side: one round trip each, the client's own cost per command
(a write, a wake-up, a read) is what limits them. The first caller of a turn leads: it
yields once so the others can join, then sends every queued call in one pipeline (no
transaction: each script is atomic alone, as before) and hands each caller its own reply
or error. No task is started. A Cluster client runs each call alone (its pipelines do not
carry scripts).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript

from prepaid.redis_client import RedisClient

MAX_BATCH = 256  # calls in one pipeline; a larger turn starts another


class ScriptBatcher:
    def __init__(self, client: RedisClient, script: AsyncScript) -> None:
        self.client = client
        self.script = script
        self.enabled = not hasattr(client, "get_node")  # not a RedisCluster
        self._queue: list[tuple[Sequence[str], Sequence[str], asyncio.Future[Any]]] = []
        self.batches = 0  # pipelines sent (for the benchmark)

    async def __call__(self, keys: Sequence[str], args: Sequence[str]) -> Any:
        if not self.enabled:
            return await self.script(keys=keys, args=args)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((keys, args, fut))
        if len(self._queue) == 1:
            await self._lead()
        return await fut

    async def _lead(self) -> None:
        try:
            await asyncio.sleep(0)  # the turn's other callers queue behind this one
        finally:
            # Even when this caller is cancelled, the others' calls are sent.
            batch, self._queue = self._queue, []
            await self._send(batch)

    async def _send(self, batch: list[tuple[Sequence[str], Sequence[str],
                                            asyncio.Future[Any]]]) -> None:
        for start in range(0, len(batch), MAX_BATCH):
            part = batch[start:start + MAX_BATCH]
            try:
                if len(part) == 1:
                    keys, args, _ = part[0]
                    replies: list[Any] = [await self.script(keys=keys, args=args)]
                else:
                    replies = await self._pipeline(part)
            except asyncio.CancelledError:
                for _, _, fut in batch[start:]:
                    fut.cancel()
                raise
            except Exception as exc:  # the link failed: every caller hears it
                replies = [exc] * len(part)
            self.batches += 1
            for (_, _, fut), reply in zip(part, replies, strict=True):
                if fut.done():
                    continue
                if isinstance(reply, Exception):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)

    async def _pipeline(self, part: list[tuple[Sequence[str], Sequence[str],
                                               asyncio.Future[Any]]]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        assert isinstance(pipe, Pipeline)
        async with pipe:
            for keys, args, _ in part:
                await self.script(keys=keys, args=args, client=pipe)
            return list(await pipe.execute(raise_on_error=False))
