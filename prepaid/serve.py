"""``prepaid serve``: the services of one host in one process, stopped cleanly on a signal."""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from prepaid.config import Settings
from prepaid.store import Store, open_store

log = logging.getLogger(__name__)

Runner = Callable[[Store, asyncio.Event], Coroutine[Any, Any, None]]
SERVICES = {"agi": "agi.server", "ami": "ami_listener.service", "policy": "policy.worker"}


def load_runner(name: str) -> Runner:
    module = importlib.import_module(SERVICES[name])
    runner: Runner = module.run
    return runner


async def run_services(settings: Settings, names: Sequence[str], stop: asyncio.Event) -> None:
    """Run each service until ``stop``; one crashing service stops the others."""
    runners = {name: load_runner(name) for name in names}
    if settings.metrics.listen:
        from prepaid.metrics import serve_metrics
        serve_metrics(settings.metrics.listen)
        log.info("metrics on http://%s/metrics", settings.metrics.listen)
    store = await open_store(settings, check=False)
    tasks: dict[asyncio.Task[None], str] = {
        asyncio.create_task(runner(store, stop), name=f"prepaid-{name}"): name
        for name, runner in runners.items()}
    log.info("serving %s (config %s, Redis %s)", ", ".join(names), settings.source,
             settings.redis.safe_url)
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not stop.is_set():
                exc = task.exception()
                log.error("service %s stopped unexpectedly: %s", tasks[task], exc or "returned")
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for task, result in zip(tasks, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(
                    result, asyncio.CancelledError):
                log.error("service %s failed: %r", tasks[task], result)
    finally:
        for task in tasks:
            task.cancel()
        # Wait for them, so no service writes to Redis after serve has returned.
        _, stuck = await asyncio.wait(tasks, timeout=10)
        for task in stuck:
            log.error("service %s did not stop within 10 s", tasks[task])
        await store.close()
    log.info("stopped")


def serve_forever(settings: Settings, names: Sequence[str], level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_services(settings, names, stop)

    asyncio.run(main())
