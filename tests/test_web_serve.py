"""``prepaid serve`` starts the web page when ``[web] listen`` is set: its own child process
on a socket the supervisor bound, restarted like the others."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from prepaid.ledger import Ledger
from testbed.servers import free_port
from tests.test_serve import PREPAID, Serve, gone, spawn_serve, write_config


async def page_answers(url: str) -> int | None:
    """The page's status code; None while nothing answers."""
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            return (await http.get(url)).status_code
    except httpx.HTTPError:
        return None


async def page_status(url: str, within: float = 20.0) -> int:
    """Poll until the page answers (a deadline, not a sleep for luck)."""
    deadline = time.monotonic() + within
    while (status := await page_answers(url)) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer within {within} s")
        await asyncio.sleep(0.05)
    return status


async def test_serve_runs_the_web_page_in_its_own_restarted_process(
        redis_url: str, ledger: Ledger, tmp_path: Path) -> None:
    web_port = free_port()
    conf = write_config(tmp_path / "p.toml", redis_url, free_port(),
                        extra=f'[web]\nlisten = "127.0.0.1:{web_port}"\n')
    log = tmp_path / "serve.log"
    proc = spawn_serve(conf, log)
    s = Serve(proc, log, 0, None)
    url = f"http://127.0.0.1:{web_port}/login"
    try:
        kids = await s.started({"agi": 1, "ami": 1, "policy": 1, "web": 1})
        assert await page_status(url) == 200
        os.kill(kids["web"][0], signal.SIGKILL)
        kids = await s.started({"web": 2})
        assert kids["web"][1] != kids["web"][0]
        # The supervisor keeps the socket: the page answers again from the new child.
        assert await page_status(url) == 200  # after the restart
        assert "service web (pid" in s.text() and "Traceback" not in s.text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert gone(kids["web"][1])
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_serve_refuses_a_taken_web_port_with_one_line(redis_url: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        conf = write_config(tmp_path / "p.toml", redis_url, free_port(),
                            extra=f'[web]\nlisten = "127.0.0.1:{port}"\n')
        res = subprocess.run([PREPAID, "--config", str(conf), "serve"], capture_output=True,
                             timeout=60, stdin=subprocess.DEVNULL)
    err = res.stderr.decode()
    assert res.returncode == 1, err
    [line] = [x for x in err.splitlines() if x.startswith("prepaid: error:")]
    assert line == (f"prepaid: error: cannot listen for the web page on [web] listen "
                    f"'127.0.0.1:{port}': address already in use")
