from __future__ import annotations

from pathlib import Path

import pytest

from prepaid.errors import RateError
from prepaid.ratedeck import Normalisation, load_csv, parse_csv
from prepaid.ratestore import RateStore

HEADER = "prefix,name,price_per_minute,connect_fee,initial_increment,increment,minimum_duration\n"
DECK = HEADER + """353,Ireland,0.0123,0,60,60,
3538,Ireland mobile,0.05,0.01,30,6,
35387,Ireland Vodafone,0.045,0.01,30,6,10
44,United Kingdom,0.02,0,1,1,
"""
IE = Normalisation(("+", "00"), "0", "353")


def test_longest_prefix_wins_after_normalisation() -> None:
    deck = parse_csv(DECK)
    assert deck.lookup("+353 87 123 4567", IE).name == "Ireland Vodafone"
    assert deck.lookup("0035386123", IE).name == "Ireland mobile"
    assert deck.lookup("0112345", IE).name == "Ireland"  # national 0 -> 353
    assert deck.lookup("0044207", IE).prefix == "44"
    rate = deck.lookup("353871", IE)
    assert (rate.per_minute, rate.connect_fee, rate.initial, rate.increment, rate.minimum) == (
        45_000, 10_000, 30, 6, 10)


def test_unknown_destination_is_refused_not_free() -> None:
    with pytest.raises(RateError, match="no rate for '999'"):
        parse_csv(DECK).lookup("999", IE)


def test_a_number_that_is_not_digits_is_refused() -> None:
    with pytest.raises(RateError, match="not a dialable number"):
        parse_csv(DECK).lookup("12a4", IE)


@pytest.mark.parametrize(("row", "message"), [
    ("35x,Bad,0.01,0,60,60,", "rates.csv:3: prefix '35x' must be 1-20 digits"),
    ("353,Dup,0.01,0,60,60,", "rates.csv:3: prefix 353 appears twice"),
    ("33,France,-0.01,0,60,60,", "rates.csv:3: price_per_minute '-0.01' is negative"),
    ("33,France,0.1234567,0,60,60,", "rates.csv:3: price_per_minute '0.1234567' has 7 decimals"),
    ("33,France,0.01,0,0,60,", "rates.csv:3: initial_increment '0' must be a whole number"),
    ("33,France,0.01,0,60,x,", "rates.csv:3: increment 'x' must be a whole number"),
    ("33,,0.01,0,60,60,", "rates.csv:3: name is empty"),
    ("33,France,0.01", "rates.csv:3: expected 7 fields"),
])
def test_bad_rows_name_file_and_line(row: str, message: str) -> None:
    text = HEADER + "353,Ireland,0.0123,0,60,60,\n" + row + "\n"
    with pytest.raises(RateError) as err:
        parse_csv(text, "rates.csv")
    assert str(err.value).startswith(message)


def test_missing_column_is_named() -> None:
    with pytest.raises(RateError, match="missing column.*connect_fee"):
        parse_csv("prefix,name,price_per_minute,initial_increment,increment\n1,x,0.1,60,60\n",
                  "d.csv")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(RateError, match="cannot read rate deck"):
        load_csv(tmp_path / "missing.csv")


async def test_import_replaces_the_whole_deck_and_services_see_it(ledger: object,
                                                                  redis_url: str) -> None:
    from prepaid.redis_client import connect
    client = connect(redis_url)
    store, other = RateStore(client), RateStore(client)
    with pytest.raises(RateError, match="no rate deck imported"):
        await other.current()
    await store.replace(parse_csv(DECK))
    assert len(await other.current()) == 4
    await store.replace(parse_csv(HEADER + "1,USA,0.01,0,60,60,\n"))
    deck = await other.current()
    assert [r.prefix for r in deck] == ["1"]
    await client.aclose()
