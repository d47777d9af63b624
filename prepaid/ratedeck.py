"""Rate decks: parsing the admin's CSV, number normalisation and longest-prefix lookup."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from prepaid.errors import InputError, RateError
from prepaid.inputs import check_text
from prepaid.money import format_amount, parse_amount
from prepaid.rating import Rate

REQUIRED_COLUMNS = ("prefix", "name", "price_per_minute", "connect_fee",
                    "initial_increment", "increment")
OPTIONAL_COLUMNS = ("minimum_duration",)
# fullmatch and [0-9] everywhere: "$" allows a newline, \d and isdigit() take "²" and "١٢".
_PREFIX_RE = re.compile(r"[0-9]{1,20}")
_NUMBER_RE = re.compile(r"[0-9]{1,32}")
_SECONDS_RE = re.compile(r"[0-9]{1,5}")
_SEPARATORS = re.compile(r"[\s().-]")
MAX_INCREMENT = 3600
DEFAULT_PLAN = "default"  # the plan of the decks imported before plans, and of their accounts
# A plan's name goes into Redis key names: no ':', '{' or '}', and short.
_PLAN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")


def check_plan(name: str, what: str = "--plan") -> str:
    if not _PLAN_RE.fullmatch(name):
        raise InputError(f"{what} {name!r} must be 1-32 letters, digits, _ or -, "
                         "starting with a letter or digit")
    return name


@dataclass(frozen=True, slots=True)
class Normalisation:
    """How dialed numbers are turned into international digits before lookup."""

    international_prefixes: tuple[str, ...] = ("+", "00")
    national_prefix: str = ""  # e.g. "0": a trunk prefix replaced by country_code
    country_code: str = ""  # e.g. "353"

    def normalise(self, number: str) -> str:
        digits = _SEPARATORS.sub("", number)
        for prefix in self.international_prefixes:
            if prefix and digits.startswith(prefix):
                digits = digits[len(prefix):]
                break
        else:
            if self.national_prefix and self.country_code and digits.startswith(
                    self.national_prefix):
                digits = self.country_code + digits[len(self.national_prefix):]
        if not _NUMBER_RE.fullmatch(digits):
            raise RateError(f"number {number!r} is not a dialable number (digits, optional +)")
        return digits


class RateDeck:
    """An immutable set of rates, looked up by longest matching prefix."""

    def __init__(self, rates: Iterable[Rate]) -> None:
        self._rates: dict[str, Rate] = {r.prefix: r for r in rates}
        self._lengths = sorted({len(p) for p in self._rates}, reverse=True)

    def __len__(self) -> int:
        return len(self._rates)

    def __iter__(self) -> Iterator[Rate]:
        return iter(sorted(self._rates.values(), key=lambda r: r.prefix))

    def match(self, digits: str) -> Rate | None:
        for length in self._lengths:
            rate = self._rates.get(digits[:length])
            if rate is not None and length <= len(digits):
                return rate
        return None

    def lookup(self, number: str, normalisation: Normalisation) -> Rate:
        digits = normalisation.normalise(number)
        rate = self.match(digits)
        if rate is None:
            raise RateError(f"no rate for {number!r} (normalised {digits}); "
                            "calls there are refused")
        return rate

    def to_mapping(self) -> dict[str, str]:
        return {r.prefix: json.dumps(asdict(r), separators=(",", ":"))
                for r in self._rates.values()}

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str]) -> RateDeck:
        return cls(Rate(**json.loads(raw)) for raw in mapping.values())


def _seconds(value: str, column: str, where: str, *, minimum: int) -> int:
    text = value.strip()
    if not _SECONDS_RE.fullmatch(text) or not (minimum <= int(text) <= MAX_INCREMENT):
        raise RateError(f"{where}: {column} {value!r} must be a whole number of seconds "
                        f"from {minimum} to {MAX_INCREMENT}")
    return int(text)


def _money(value: str, column: str, where: str) -> int:
    try:
        return parse_amount(value, what=column, allow_zero=True)
    except InputError as exc:
        raise RateError(f"{where}: {exc}") from None


def iter_csv(lines: Iterable[str], source: str = "<csv>") -> Iterator[tuple[str, Rate]]:
    """Parse a deck row by row, yielding ``(source:line, rate)``; the first bad row raises.

    Streaming: memory does not grow with the deck. Duplicate prefixes are the caller's to
    find (:func:`parse_csv` in memory, the rate store in Redis)."""
    reader = csv.DictReader(lines)
    header = [h.strip() for h in (reader.fieldnames or [])]
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice:
        raise RateError(f"{source}:1: column(s) {', '.join(twice)} appear more than once")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise RateError(f"{source}:1: missing column(s) {', '.join(missing)}; "
                        f"expected {','.join(REQUIRED_COLUMNS)}[,minimum_duration]")
    unknown = [c for c in header if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        raise RateError(f"{source}:1: unknown column(s) {', '.join(unknown)}")
    reader.fieldnames = header
    for row in reader:
        where = f"{source}:{reader.line_num}"
        if None in row or any(v is None for v in row.values()):
            raise RateError(f"{where}: expected {len(header)} fields")
        if not any((v or "").strip() for v in row.values()):
            continue
        prefix = row["prefix"].strip().lstrip("+")
        if not _PREFIX_RE.fullmatch(prefix):
            raise RateError(f"{where}: prefix {row['prefix']!r} must be 1-20 digits")
        name = row["name"].strip()
        if not name:
            raise RateError(f"{where}: name is empty")
        try:
            check_text(name, "name")
        except InputError as exc:
            raise RateError(f"{where}: {exc}") from None
        minimum = (row.get("minimum_duration") or "").strip()
        yield where, Rate(
            prefix=prefix,
            name=name,
            per_minute=_money(row["price_per_minute"], "price_per_minute", where),
            connect_fee=_money(row["connect_fee"], "connect_fee", where),
            initial=_seconds(row["initial_increment"], "initial_increment", where, minimum=1),
            increment=_seconds(row["increment"], "increment", where, minimum=1),
            minimum=_seconds(minimum, "minimum_duration", where, minimum=0) if minimum else 0,
        )


def parse_csv(text: str, source: str = "<csv>") -> RateDeck:
    """Parse a whole deck in memory; the first bad row raises, naming ``source:line``."""
    return _collect(iter_csv(io.StringIO(text), source), source)


def _collect(rows: Iterable[tuple[str, Rate]], source: str) -> RateDeck:
    rates: dict[str, Rate] = {}
    for where, rate in rows:
        if rate.prefix in rates:
            raise RateError(f"{where}: prefix {rate.prefix} appears twice")
        rates[rate.prefix] = rate
    if not rates:
        raise RateError(f"{source}: no rates in the file")
    return RateDeck(rates.values())


def read_lines(path: Path, on_chars: Callable[[int], None] | None = None) -> Iterator[str]:
    """The file's lines, one at a time (``on_chars`` is told how much was read, for a
    progress bar); unreadable or non-UTF-8 files raise RateError naming the file."""
    try:
        handle = path.open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise RateError(f"{path}: cannot read rate deck: {exc.strerror}") from None
    with handle:
        try:
            for line in handle:
                if on_chars is not None:
                    on_chars(len(line))
                yield line
        except UnicodeDecodeError:
            raise RateError(f"{path}: rate deck is not UTF-8 text") from None
        except OSError as exc:
            raise RateError(f"{path}: cannot read rate deck: {exc.strerror}") from None


def load_csv(path: Path) -> RateDeck:
    return _collect(iter_csv(read_lines(path), str(path)), str(path))


def rate_row(rate: Rate) -> list[str]:
    """A rate as a CSV row of :data:`CSV_COLUMNS`, read back by :func:`iter_csv` unchanged."""
    return [rate.prefix, rate.name, format_amount(rate.per_minute, decimals=0),
            format_amount(rate.connect_fee, decimals=0), str(rate.initial),
            str(rate.increment), str(rate.minimum)]


CSV_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
