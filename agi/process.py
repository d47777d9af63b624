"""Classic process AGI: ``AGI(prepaid-agi,authorize)`` runs the very same routes over
stdin/stdout, one process per call, for admins who cannot run the FastAGI daemon.

Asterisk sends SIGHUP when the channel hangs up; it is caught and turned into a hangup of
the session, so a reservation made meanwhile is released, not leaked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from agi.decision import Reason, Status
from agi.protocol import MAX_LINE, AgiError, AgiSession, read_header
from agi.routes import ROUTES, dispatch, new_context
from prepaid import config
from prepaid.errors import ConfigError
from prepaid.store import open_store

log = logging.getLogger(__name__)

USAGE = f"usage: prepaid-agi {{{'|'.join(ROUTES)}}} [NUMBER]"


class _StdoutWriter:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    async def drain(self) -> None:
        return None


async def _stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def serve_stdio(route: str) -> int:
    reader = await _stdin_reader()
    writer = _StdoutWriter(sys.stdout.fileno())
    hung_up = False

    def on_sighup() -> None:
        nonlocal hung_up
        hung_up = True
        if session is not None:
            session.mark_hangup()

    session: AgiSession | None = None
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
    try:
        env = await read_header(reader)
    except AgiError as exc:
        log.error("%s", exc)
        return 1
    session = AgiSession(env, reader, writer, script=route)
    if hung_up:
        session.mark_hangup()
    try:
        settings = config.load()
    except ConfigError as exc:
        log.error("%s", exc)
        try:
            await session.set_variable("PREPAID_STATUS", Status.ERROR.value)
            await session.set_variable("PREPAID_REASON", Reason.INTERNAL.value)
        except AgiError:
            pass
        return 1
    store = await open_store(settings, check=False)
    try:
        # One call per process: no metering heartbeat counts at once (watching_since=None).
        ctx = new_context(store, watching_since=None)
        await dispatch(session, store, ctx)
        await ctx.drain()  # the call's outcome, logged after Asterisk was answered
    finally:
        await store.close()
    return 0


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=os.environ.get("PREPAID_LOG_LEVEL", "INFO").upper(),
                        stream=sys.stderr, format="prepaid-agi: %(levelname)s %(message)s")
    if not args or args[0] not in ROUTES:
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(asyncio.run(serve_stdio(args[0])))


if __name__ == "__main__":
    main()
