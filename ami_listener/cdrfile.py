"""Asterisk's CDR as cdr_custom writes it (``asterisk-conf/cdr_custom.conf``): the record of a
call that survives the listener's absence.

A call that ended while the listener was away (a restart, a crash, a dropped AMI session)
missed its ``Cdr`` event; its billable seconds are read here instead. Each line is
``"uniqueid",billsec,"disposition",answer,end,"accountcode"``; only the file's tail is read,
where calls of the last minutes are, and it is parsed again only once the file has grown.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

TAIL_BYTES = 8 << 20  # about 60,000 calls back


class CdrFile:
    def __init__(self, path: Path, tail_bytes: int = TAIL_BYTES) -> None:
        self.path = path
        self.tail_bytes = tail_bytes
        self._seen: tuple[int, int] | None = None  # (inode, size) last parsed
        self._billsec: dict[str, int] = {}
        self._failing = False

    async def billsec(self, uniqueid: str) -> int | None:
        """The call's billable seconds, or None when the file has no line for it."""
        if uniqueid not in self._billsec:
            await asyncio.to_thread(self._refresh)
        return self._billsec.get(uniqueid)

    def outage(self, exc: OSError) -> None:
        if not self._failing:
            log.warning("CDR file %s cannot be read: %s; calls that ended while the listener "
                        "was away are billed from the time they paid for", self.path, exc)
        self._failing = True

    def _refresh(self) -> None:
        with self.path.open("rb") as f:
            st = os.fstat(f.fileno())
            if self._seen == (st.st_ino, st.st_size):
                return
            start = max(0, st.st_size - self.tail_bytes)
            f.seek(start)
            data = f.read(st.st_size - start)
        if start:
            data = data.partition(b"\n")[2]  # the first line is cut
        self._billsec = parse(data.decode("utf-8", "replace"))
        self._seen = (st.st_ino, st.st_size)
        if self._failing:
            log.info("CDR file %s readable again", self.path)
            self._failing = False


def parse(text: str) -> dict[str, int]:
    """uniqueid -> billsec of every well-formed line; a channel's CDRs (one per transfer
    leg) share out its time, so they are added up."""
    out: dict[str, int] = {}
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 2 and row[0] and row[1].strip().isdigit():
            out[row[0]] = out.get(row[0], 0) + int(row[1])
    return out
