"""The "My account" web page for the tests and the demo, and a headless Chromium to look at it.

    with WebPage(settings) as page:          # policy.web.app.run in its own thread and loop
        browser = chromium()                 # Debian's chromium through /usr/bin/chromedriver
        browser.get(page.url + "/login")

The page runs exactly as ``prepaid serve`` runs it (``policy.web.app.run``: uvicorn and the
reconciliation pass), in a thread of its own so that a blocking browser driver can talk to
it from the test's thread.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from policy.web import app as web_app
from prepaid.config import Settings
from prepaid.store import open_store
from testbed.servers import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def with_web(settings: Settings, port: int | None = None, **web: Any) -> Settings:
    """``settings`` with the page on 127.0.0.1 (a free port unless given)."""
    listen = f"127.0.0.1:{port or free_port()}"
    return replace(settings, web=replace(settings.web, listen=listen, **web))


class WebPage:
    def __init__(self, settings: Settings) -> None:
        if not settings.web.listen:
            settings = with_web(settings)
        self.settings = settings
        scheme = "https" if settings.web.cert else "http"
        self.url = f"{scheme}://{settings.web.listen}"
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.error: BaseException | None = None

    def _main(self) -> None:
        async def go() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            store = await open_store(self.settings)
            try:
                await web_app.run(store, self._stop)
            finally:
                await store.close()
        try:
            asyncio.run(go())
        except BaseException as exc:  # noqa: BLE001 - handed to the test that waits
            self.error = exc

    def start(self, timeout: float = 15.0) -> WebPage:
        self._thread = threading.Thread(target=self._main, name="web-page", daemon=True)
        self._thread.start()
        web = self.settings.web
        deadline = time.monotonic() + timeout
        while True:  # polling a condition with a deadline: the port answers
            if self.error is not None:
                raise RuntimeError(f"the web page did not start: {self.error!r}")
            try:
                with socket.create_connection((web.host, web.port), timeout=0.2):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the web page did not listen on {web.listen}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                pass  # its loop has ended already
        if self._thread is not None:
            self._thread.join(15)
            self._thread = None

    def __enter__(self) -> WebPage:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def browser_missing() -> str:
    """Why a headless Chromium cannot run here ('' when it can)."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        return ("Debian's chromium and chromium-driver are not installed (scripts/setup.sh "
                "installs them as root)")
    if shutil.which("chromium") is None:
        return "chromium is not on PATH"
    return ""


def screenshot(driver: Any, path: Path) -> Path:
    """The whole page, not only the window: the window is made as tall as the page."""
    width = int(driver.get_window_size()["width"])
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    before = driver.get_window_size()
    driver.set_window_size(width, height + 120)  # the browser's own frame takes some
    driver.save_screenshot(str(path))
    driver.set_window_size(before["width"], before["height"])
    return path


def chromium(width: int = 1100, height: int = 1400) -> Any:
    """A headless Chromium (Debian's) driven by Selenium through Debian's chromedriver."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--lang=en", "--no-first-run",
                "--disable-extensions", "--password-store=basic"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
