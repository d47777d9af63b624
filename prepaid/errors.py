"""One exception base for the project, mixed with the matching builtin where one fits."""

from __future__ import annotations


class PrepaidError(Exception):
    """Base of every error this project raises on purpose."""


class InputError(PrepaidError, ValueError):
    """Bad input from a person or a file: the message names what and where."""


class ConfigError(InputError):
    """A configuration file or environment value is wrong."""


class RateError(InputError):
    """A rate deck row is malformed, or a number has no rate."""


class NoRateDeck(RateError):
    """No rate deck has been imported: a fault of the installation, not of the number."""


class LedgerError(PrepaidError):
    """A ledger operation was refused; ``code`` says why (NO_CREDIT, NO_ACCOUNT, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class UnknownAccount(LedgerError, LookupError):
    def __init__(self, account: str) -> None:
        super().__init__("NO_ACCOUNT", f"account {account!r} does not exist")
        self.account = account


class StoreUnavailable(PrepaidError, ConnectionError):
    """Redis cannot be reached; the message names the URL (without its password)."""


class ServeError(PrepaidError):
    """``prepaid serve`` cannot serve (a port taken, a bad [agi] allow entry): exit non-zero."""
