"""History and calls older than the retention window, moved from Redis to monthly files.

``prepaid archive`` streams each account's history and call history entries older than a
date, in order, to ``DIR/YYYY-MM/ACCOUNT.history.jsonl`` (``.calls.jsonl``; or ``.csv``),
fsyncs the files, records how far it got in the account's ``archived`` hash, and only then
trims the streams (XTRIM MINID).  A run cut short anywhere is repeated safely: entries
already in a file (its last id) or recorded as archived are not written again, and nothing
is trimmed that is not on disk.  :func:`read` gives a stream's archived entries back, oldest
first, for ``prepaid verify`` and ``prepaid history``.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prepaid import keys
from prepaid.config import ArchiveSettings
from prepaid.errors import InputError, PrepaidError, StoreUnavailable
from prepaid.ledger import Ledger
from prepaid.redis_client import REDIS_ERRORS, text
from prepaid.scan import account_batches

log = logging.getLogger(__name__)

STREAMS = ("history", "calls")
FORMATS = ("jsonl", "csv")
PAGE = 1000
# The columns of a CSV file, after the entry id; fields beyond them go in "extra" (JSON).
COLUMNS = {
    "history": ("kind", "amount", "balance", "held", "ref", "hold", "key", "operator",
                "reason"),
    "calls": ("ref", "account", "number", "prefix", "rate", "answered", "ended", "duration",
              "billed", "cost", "blocks", "cause", "source", "cutoff", "tariff", "plan"),
}
_MONTH = re.compile(r"[0-9]{4}-[0-9]{2}")

Fields = dict[str, str]


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def month_of(entry_id: str) -> str:
    return datetime.fromtimestamp(id_key(entry_id)[0] / 1000, UTC).strftime("%Y-%m")


def path_for(root: Path, month: str, account: str, stream: str, fmt: str) -> Path:
    # The account id is one path part behind a suffix: '..' names the file '...history.csv'.
    return root / month / f"{account}.{stream}.{fmt}"


def line(stream: str, fmt: str, entry_id: str, f: Fields) -> str:
    """One entry as a line of the file (pure)."""
    if fmt == "jsonl":
        return json.dumps({"id": entry_id, **f}, separators=(",", ":")) + "\n"
    cols = COLUMNS[stream]
    extra = {k: v for k, v in f.items() if k not in cols}
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(
        [entry_id, *(f.get(c, "") for c in cols), json.dumps(extra) if extra else ""])
    return out.getvalue()


def header(stream: str) -> str:
    return ",".join(("id", *COLUMNS[stream], "extra")) + "\n"


def parse_line(stream: str, fmt: str, raw: str) -> tuple[str, Fields] | None:
    """(id, fields) of one line; None for a CSV header or an empty line."""
    if not raw.strip():
        return None
    if fmt == "jsonl":
        data = json.loads(raw)
        return str(data.pop("id")), {str(k): str(v) for k, v in data.items()}
    row = next(csv.reader([raw]))
    if row[0] == "id":
        return None
    cols = COLUMNS[stream]
    f = dict(zip(cols, row[1:1 + len(cols)], strict=False))
    if len(row) > len(cols) + 1 and row[-1]:
        f.update(json.loads(row[-1]))
    return row[0], f


def _months(root: Path) -> list[str]:
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and _MONTH.fullmatch(p.name))
    except FileNotFoundError:
        return []


def _read_file(path: Path, stream: str, fmt: str) -> Iterator[tuple[str, Fields]]:
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            for n, raw in enumerate(fh, 1):
                if not raw.endswith("\n"):
                    return  # being written, or torn by a crash: never marked archived
                try:
                    parsed = parse_line(stream, fmt, raw)
                except (ValueError, KeyError, IndexError, StopIteration):
                    raise InputError(f"{path}:{n}: not an archived {stream} entry") from None
                if parsed is not None:
                    yield parsed
    except FileNotFoundError:
        return


def read(root: Path, account: str, stream: str) -> Iterator[tuple[str, Fields]]:
    """Every archived entry of the account's ``stream``, oldest first."""
    for month in _months(root):
        parts = [list(_read_file(path_for(root, month, account, stream, fmt), stream, fmt))
                 if path_for(root, month, account, stream, fmt).exists() else []
                 for fmt in FORMATS]
        both = [p for p in parts if p]
        if len(both) == 1:
            yield from both[0]
        elif both:  # the format was changed within the month
            yield from sorted((e for p in both for e in p), key=lambda e: id_key(e[0]))


def read_reversed(root: Path, account: str, stream: str) -> Iterator[tuple[str, Fields]]:
    """The same, newest first (a month's file at a time)."""
    for month in reversed(_months(root)):
        month_entries = [e for fmt in FORMATS
                         for e in _read_file(path_for(root, month, account, stream, fmt),
                                             stream, fmt)]
        month_entries.sort(key=lambda e: id_key(e[0]), reverse=True)
        yield from month_entries


def _tail(path: Path, stream: str, fmt: str) -> tuple[str, Fields] | None:
    """The last whole entry of a file (its end read, not the whole file)."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - 65536))
            chunk = fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    for raw in reversed(chunk.split("\n")[1 if size > 65536 else 0:]):
        try:
            parsed = parse_line(stream, fmt, raw)
        except (ValueError, KeyError, IndexError, StopIteration):
            continue  # a line torn by a crash: it was never marked archived
        if parsed is not None:
            return parsed
    return None


def _last_in_files(root: Path, account: str, stream: str) -> tuple[str, Fields] | None:
    """The newest entry already written for this stream (a run cut short before its mark),
    a line torn by a crash cut off first."""
    for month in reversed(_months(root)):
        for fmt in FORMATS:
            if path_for(root, month, account, stream, fmt).exists():
                _cut_torn_line(path_for(root, month, account, stream, fmt))
        tails = [t for fmt in FORMATS
                 if (t := _tail(path_for(root, month, account, stream, fmt), stream, fmt))]
        if tails:
            return max(tails, key=lambda t: id_key(t[0]))
    return None


def _cut_torn_line(path: Path) -> None:
    """Drop a last line without its newline (a write cut by a crash, never fsynced)."""
    with path.open("rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(max(0, size - 65536))
        chunk = fh.read()
        if chunk.endswith(b"\n"):
            return
        cut = chunk.rfind(b"\n")
        fh.truncate(size - len(chunk) + cut + 1 if cut >= 0 else max(0, size - len(chunk)))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(slots=True)
class Result:
    accounts: int = 0
    history: int = 0
    calls: int = 0
    files: set[Path] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"accounts": self.accounts, "history": self.history, "calls": self.calls,
                "files": sorted(str(p) for p in self.files or ())}


def check_dir(root: Path) -> None:
    """The archive directory exists or can be made, and is writable: else InputError,
    before anything is read or trimmed."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--dir {str(root)!r}: cannot create it: {exc.strerror}") from None
    if not root.is_dir():
        raise InputError(f"--dir {str(root)!r} is not a directory")
    if not os.access(root, os.W_OK | os.X_OK):
        raise InputError(f"--dir {str(root)!r} is not writable")


class Archiver:
    """Moves entries older than ``before_ms`` to files under ``root``, account by account."""

    def __init__(self, ledger: Ledger, root: Path, fmt: str = "jsonl", page: int = PAGE) -> None:
        if fmt not in FORMATS:
            raise InputError(f"--format {fmt!r} must be jsonl or csv")
        self.ledger, self.redis, self.prefix = ledger, ledger.redis, ledger.prefix
        self.root, self.fmt, self.page = root, fmt, page

    def stream_key(self, account: str, stream: str) -> str:
        return (self.ledger.keys(account)[2] if stream == "history"
                else keys.account_calls(self.prefix, account))

    async def run(self, before_ms: int, account: str | None = None) -> Result:
        check_dir(self.root)
        result = Result(files=set())
        try:
            if account is not None:
                await self.ledger.get(account)
                batches: Any = _one(account)
            else:
                batches = account_batches(self.redis, self.prefix, 200)
            async for ids in batches:
                for a in ids:
                    await self.account(a, before_ms, result)
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"Redis at {self.ledger.url or 'the configured URL'} is "
                                   f"unavailable during archive: {exc}") from exc
        return result

    async def account(self, account: str, before_ms: int, result: Result) -> None:
        mark_key = keys.archive_mark(self.prefix, account)
        mark = {text(k): text(v) for k, v in (await self.redis.hgetall(mark_key)).items()}
        moved = False
        for stream in STREAMS:
            done, done_fields = mark.get(stream, ""), None
            in_files = _last_in_files(self.root, account, stream)
            if in_files and (not done or id_key(in_files[0]) > id_key(done)):
                done, done_fields = in_files  # written before a crash, not yet marked
            last, n, f_last = await self._copy(account, stream, before_ms, done, result)
            if not last:
                if done_fields is not None:  # a crash between fsync and mark
                    await self._mark_and_trim(account, stream, done, done_fields)
                continue
            moved = True
            await self._mark_and_trim(account, stream, last, f_last)
            setattr(result, stream, getattr(result, stream) + n)
        result.accounts += moved

    async def _copy(self, account: str, stream: str, before_ms: int, after: str,
                    result: Result) -> tuple[str, int, Fields | None]:
        """Append the stream's entries after ``after`` and before ``before_ms`` to their
        month files, fsynced; returns the last id written, how many and its fields."""
        key = self.stream_key(account, stream)
        start = "(" + after if after else "-"
        last, n, fields = "", 0, None
        handles: dict[Path, Any] = {}
        try:
            while True:
                rows = await self.redis.xrange(key, start, f"({before_ms}-0", count=self.page)
                for raw_id, raw in rows or []:
                    entry_id = text(raw_id)
                    f = {text(k): text(v) for k, v in (raw or {}).items()}
                    fh = self._handle(handles, account, stream, month_of(entry_id))
                    fh.write(line(stream, self.fmt, entry_id, f))
                    last, n, fields = entry_id, n + 1, f
                if not rows or len(rows) < self.page:
                    break
                start = "(" + last
            for path, fh in handles.items():
                fh.flush()
                os.fsync(fh.fileno())
                _fsync_dir(path.parent)
                assert result.files is not None
                result.files.add(path)
        finally:
            for fh in handles.values():
                fh.close()
        if handles:
            _fsync_dir(self.root)
        return last, n, fields

    def _handle(self, handles: dict[Path, Any], account: str, stream: str, month: str) -> Any:
        path = path_for(self.root, month, account, stream, self.fmt)
        if path not in handles:
            path.parent.mkdir(exist_ok=True)
            if path.exists():
                _cut_torn_line(path)  # an older month's file (the newest one's is cut)
            new = not path.exists() or path.stat().st_size == 0
            handles[path] = path.open("a", encoding="utf-8", newline="")
            if new and self.fmt == "csv":
                handles[path].write(header(stream))
        return handles[path]

    async def _mark_and_trim(self, account: str, stream: str, last: str,
                             f: Fields | None) -> None:
        """Record that the stream is on disk up to ``last``, then trim it up to there."""
        mapping: dict[Any, Any] = {stream: last}
        if stream == "history" and f is not None:
            mapping.update(history_balance=f.get("balance", "0"), history_held=f.get("held", "0"))
        await self.redis.hset(keys.archive_mark(self.prefix, account), mapping=mapping)
        ms, seq = id_key(last)
        await self.redis.xtrim(self.stream_key(account, stream), minid=f"{ms}-{seq + 1}",
                               approximate=False)


async def _one(account: str) -> Any:
    yield [account]


DAY = 86400
DAILY_TRY_SECONDS = 3600  # how often `serve` looks whether today's archive is still to run


async def daily(ledger: Ledger, settings: ArchiveSettings, stop: asyncio.Event, *,
                every: float = DAILY_TRY_SECONDS) -> None:
    """``[archive] daily``: once a day, one of the servers sharing the Redis (the one that
    takes the day's key first) archives what is older than ``retention_days``. A run that
    fails gives the day back, to be tried again ``every`` seconds later."""
    host = socket.gethostname()
    while not stop.is_set():
        day = int(time.time() // DAY)
        key = keys.archive_day(ledger.prefix, day)
        try:
            if await ledger.redis.set(key, host, nx=True, ex=2 * DAY):
                before_ms = (day - settings.retention_days) * DAY * 1000
                try:
                    result = await Archiver(ledger, settings.dir, settings.format).run(before_ms)
                except (PrepaidError, OSError) as exc:
                    await ledger.redis.delete(key)
                    log.error("daily archive to %s failed: %s; trying again in %.0f s",
                              settings.dir, exc, every)
                else:
                    log.info("daily archive: %s history entries and %s calls of %s accounts "
                             "moved to %s", result.history, result.calls, result.accounts,
                             settings.dir)
        except REDIS_ERRORS as exc:
            log.warning("daily archive: Redis unavailable (%s); trying again in %.0f s", exc,
                        every)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
