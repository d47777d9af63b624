from __future__ import annotations

import logging

import pytest

from prepaid.outage import OutageLog


def test_an_outage_is_logged_once_and_its_end_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    outage = OutageLog(logging.getLogger("t"), "Redis at redis://x")
    for _ in range(5):
        outage.failure(ConnectionError("refused"))
    outage.success()
    outage.success()
    levels = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [lvl for lvl, _ in levels] == ["ERROR"] + ["DEBUG"] * 4 + ["INFO"]
    assert levels[0][1] == "Redis at redis://x unavailable: refused"
    assert levels[-1][1] == "Redis at redis://x recovered after 5 failure(s)"
    assert not outage.down
