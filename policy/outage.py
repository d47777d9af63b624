"""Log an outage once when it starts and once when it ends, not once per event."""

from __future__ import annotations

import logging


class Outage:
    def __init__(self, what: str, log: logging.Logger) -> None:
        self.what = what
        self.log = log
        self.failures = 0  # consecutive failures, for backoff

    @property
    def down(self) -> bool:
        return self.failures > 0

    def failed(self, exc: BaseException) -> None:
        if self.failures == 0:
            self.log.error("%s unavailable: %s; retrying with backoff", self.what, exc)
        self.failures += 1

    def ok(self) -> None:
        if self.failures:
            self.log.warning("%s available again after %s failed attempts", self.what,
                             self.failures)
        self.failures = 0
