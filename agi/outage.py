"""Log an outage once: the first failure at ERROR, repeats at DEBUG, recovery at INFO."""

from __future__ import annotations

import logging


class OutageLog:
    """Shared by every call of a service, so an outage shows up once, not once per call."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger = logger
        self.what = what
        self.down = False
        self.failures = 0

    def failure(self, error: object) -> None:
        self.failures += 1
        if not self.down:
            self.down = True
            self.logger.error("%s unavailable, calls get the fail-safe answer: %s",
                              self.what, error)
        else:
            self.logger.debug("%s still unavailable: %s", self.what, error)

    def success(self) -> None:
        if self.down:
            self.down = False
            self.logger.info("%s recovered after %s failed call(s)", self.what, self.failures)
            self.failures = 0
