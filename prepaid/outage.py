"""Log an outage once: the first failure at ERROR, repeats at DEBUG, recovery once at INFO."""

from __future__ import annotations

import logging


class OutageLog:
    """One per dependency of a service (Redis, AMI, SMTP, ...), shared by all its calls."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger = logger
        self.what = what
        self.failures = 0  # consecutive failures; services use it for back-off

    @property
    def down(self) -> bool:
        return self.failures > 0

    def failure(self, error: object) -> None:
        if self.failures == 0:
            self.logger.error("%s unavailable: %s", self.what, error)
        else:
            self.logger.debug("%s still unavailable: %s", self.what, error)
        self.failures += 1

    def success(self) -> None:
        if self.failures:
            self.logger.info("%s recovered after %s failure(s)", self.what, self.failures)
            self.failures = 0
