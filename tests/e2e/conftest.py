"""Fixtures for the end-to-end tier against a real Asterisk 22 (see testbed/pbx.py).

Without root (or without a way to build the root folder) these tests skip, unless
PREPAID_REQUIRE_PBX=1, where they fail instead.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed.pbx import Pbx, free_port, pbx_unavailable_reason, root_path


def _unavailable(reason: str) -> None:
    if os.environ.get("PREPAID_REQUIRE_PBX") == "1":
        pytest.fail(f"PBX tier required (PREPAID_REQUIRE_PBX=1) but unavailable: {reason}",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pbx_root() -> Path:
    """The cached Debian unstable root folder with Asterisk 22 and SIPp (built once)."""
    reason = pbx_unavailable_reason()
    if reason is not None:
        _unavailable(reason)
    return root_path()


@pytest.fixture
def pbx_agi_port() -> int:
    """The FastAGI port the dialplan's `agi://` URLs point at. Override this fixture in a
    test module (or use `make_pbx(agi_port=...)`) to aim at your own FastAGI server.
    By default a free port where nothing listens."""
    return free_port(socket.SOCK_STREAM)


@pytest.fixture
def make_pbx(pbx_root: Path) -> Iterator[Callable[..., Pbx]]:
    """Factory: `make_pbx(agi_port=..., hangup_after=..., sip_context=...)` starts an Asterisk;
    every one started is stopped after the test, pass or fail."""
    started: list[Pbx] = []

    def make(**kwargs: object) -> Pbx:
        pbx = Pbx(pbx_root, **kwargs)  # type: ignore[arg-type]
        started.append(pbx)
        return pbx.start()

    yield make
    for pbx in reversed(started):
        pbx.stop()


@pytest.fixture
def pbx(make_pbx: Callable[..., Pbx], pbx_agi_port: int) -> Pbx:
    """A running Asterisk on free ports, its dialplan's FastAGI at 127.0.0.1:pbx_agi_port."""
    return make_pbx(agi_port=pbx_agi_port)
