"""The date range of a report or an export: ``--since`` / ``--until`` as the admin types them.

A bare date is a whole day in this host's time zone: ``--since 2026-11-01 --until
2026-11-30`` is November, both ends included. A time (``2026-11-30T18:00``, seconds and a
UTC offset or ``Z`` optional) is that instant; ``--until`` stops just before it. Entries are
placed by their stream id, Redis's clock when they were written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from prepaid.errors import InputError

_FORMAT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
                     r"(?:[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,6})?)?"
                     r"(?:Z|[+-][0-9]{2}:?[0-9]{2})?)?")
_HELP = "YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS][+HH:MM]"


def parse_when(text: str, option: str, *, end: bool = False) -> float:
    """Seconds since the epoch; a bare date with ``end`` is the start of the next day."""
    if not text.isascii() or not _FORMAT.fullmatch(text):
        raise InputError(f"{option} {text!r} is not a date or time ({_HELP})")
    try:
        if len(text) == 10:
            day = date.fromisoformat(text) + timedelta(days=1 if end else 0)
            return datetime(day.year, day.month, day.day).astimezone().timestamp()
        stamp = datetime.fromisoformat(text)
    except (ValueError, OverflowError) as exc:
        raise InputError(f"{option} {text!r} is not a valid date or time: {exc}") from None
    return (stamp if stamp.tzinfo else stamp.astimezone()).timestamp()


@dataclass(frozen=True, slots=True)
class Period:
    since: float | None = None  # included
    until: float | None = None  # excluded

    @property
    def bounded(self) -> bool:
        return self.since is not None or self.until is not None

    @property
    def start_id(self) -> str:
        """XRANGE's start for it: the first id at or after ``since``."""
        return "-" if self.since is None else f"{_ms(self.since)}-0"

    @property
    def end_id(self) -> str:
        """XRANGE's end: ids before ``until`` (exclusive, Redis 6.2's '(')."""
        return "+" if self.until is None else f"({_ms(self.until)}-0"

    def to_json(self) -> dict[str, str | None]:
        return {"since": _iso(self.since), "until": _iso(self.until)}


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds).astimezone().isoformat(
        timespec="seconds")


def parse_period(since: str | None, until: str | None) -> Period:
    """``--since`` and ``--until`` (either may be left out); since must come before until."""
    start = None if since is None else parse_when(since, "--since")
    stop = None if until is None else parse_when(until, "--until", end=True)
    if start is not None and stop is not None and start >= stop:
        raise InputError(f"--since {since} is not before --until {until}")
    return Period(start, stop)
