"""The web demo (``make demo-web``, and what ``make demo`` shows after its calls) takes its
screenshots of the real page in headless Chromium."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed import webdemo
from testbed.web import browser_missing

pytestmark = pytest.mark.skipif(bool(browser_missing()), reason=browser_missing())


def test_the_web_demo_prints_screenshots_of_each_page(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
        ) -> None:
    monkeypatch.setattr(webdemo, "BASE", tmp_path / "work")
    assert webdemo.main(["--screenshots", str(tmp_path / "shots")]) == 0
    printed = capsys.readouterr().out.splitlines()
    names = ["login.png", "account.png", "sandbox-payment.png"]
    assert printed == [f"screenshot: {tmp_path / 'shots' / n}" for n in names]
    for name in names:
        data = (tmp_path / "shots" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
