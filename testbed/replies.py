"""Redis replies as the tests read them: text, typed.

redis-py types a reply for either ``decode_responses`` setting (``bytes | str``, a stream's
fields ``dict | None``, a whole reply ``| None``); the project's clients return bytes.  These
decode what came back, so an assertion reads ``fields["kind"]`` and mypy checks it.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def fields(raw: Mapping[bytes, bytes] | Mapping[str, str] | Mapping[bytes | str, bytes | str]
           | None) -> dict[str, str]:
    """A hash (HGETALL) or a stream entry's fields, decoded."""
    return {text(k): text(v) for k, v in (raw or {}).items()}


def entries(raw: Iterable[tuple[bytes | str | None, Mapping[bytes | str, bytes | str] | None]]
            | None) -> list[tuple[str, dict[str, str]]]:
    """A stream's entries (XRANGE, XREVRANGE) as (id, fields), decoded."""
    return [(text(i or b""), fields(f)) for i, f in raw or []]
