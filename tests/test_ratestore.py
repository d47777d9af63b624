"""Rate decks of carrier size: lookups that do not read the deck, streamed imports that are
all or nothing, export, and dry runs; against a real Redis."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prepaid.errors import RateError
from prepaid.ratedeck import Normalisation, iter_csv, parse_csv
from prepaid.ratestore import RateStore
from prepaid.redis_client import connect
from tests.conftest import Run, cli

HEADER = "prefix,name,price_per_minute,connect_fee,initial_increment,increment\n"
DECK = HEADER + ("353,Ireland,0.0123,0,60,60\n3538,Ireland mobile,0.05,0.01,30,6\n"
                 "44,United Kingdom,0.02,0,1,1\n")
NORM = Normalisation()
PROMPT = Path(sys.executable).parent / "prepaid"


def big_deck(rows: int, price: str = "0.01") -> str:
    """``rows`` distinct 9-digit prefixes under 1 (the NANP), one per line."""
    lines = [HEADER] + [f"1{n:08d},Dest {n},{price},0,60,60\n" for n in range(rows)]
    return "".join(lines)


@pytest.fixture
def run(redis_url: str, tmp_path: Path) -> Run:
    conf = tmp_path / "prepaid.toml"
    conf.write_text(f'[redis]\nurl = "{redis_url}"\n[billing]\ncurrency = "EUR"\n')
    return cli(conf)


async def commands(client: object) -> dict[str, int]:
    info = await client.info("commandstats")  # type: ignore[attr-defined]
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in info.items()}


async def test_a_lookup_is_one_hmget_whatever_the_deck_size(redis_url: str) -> None:
    client = connect(redis_url)
    store, reader = RateStore(client), RateStore(client)
    report = await store.load(iter_csv(io.StringIO(big_deck(30_000)), "big.csv"))
    assert report.rows == 30_000 and report.version == 1
    assert (await reader.lookup("+1 00001234 5", NORM)).name == "Dest 1234"
    await client.config_resetstat()
    for n in (1, 2, 29_999):
        assert (await reader.lookup(f"001{n:08d}77", NORM)).name == f"Dest {n}"
    with pytest.raises(RateError, match="no rate for"):
        await reader.lookup("4477", NORM)
    used = await commands(client)
    # Each lookup: GET of the version and one HMGET of the number's prefixes, no more.
    assert used.get("hmget") == 4 and used.get("get") == 4
    assert not {"hgetall", "hscan", "hkeys", "hvals"} & set(used)
    await client.aclose()


async def test_a_new_deck_replaces_the_old_one_and_the_old_one_is_deleted(
        redis_url: str) -> None:
    client = connect(redis_url)
    store, reader = RateStore(client), RateStore(client)
    with pytest.raises(RateError, match="no rate deck imported"):
        await reader.lookup("353", NORM)
    assert await store.replace(parse_csv(DECK)) == 1
    assert (await reader.lookup("3538123", NORM)).name == "Ireland mobile"
    assert await store.replace(parse_csv(HEADER + "1,USA,0.01,0,60,60\n")) == 2
    with pytest.raises(RateError, match="no rate for"):
        await reader.lookup("3538123", NORM)  # the reader's cached version moved on
    assert (await reader.lookup("1555", NORM)).name == "USA"
    keys = sorted([k.decode() async for k in client.scan_iter("prepaid:{rates}:*")])
    assert keys == ["prepaid:{rates}:deck:2", "prepaid:{rates}:next", "prepaid:{rates}:plans",
                    "prepaid:{rates}:version"]
    await client.aclose()


async def test_a_deck_of_an_older_release_is_still_read_and_replaced(redis_url: str) -> None:
    client = connect(redis_url)
    rate = json.dumps({"prefix": "49", "name": "Germany", "per_minute": 60_000,
                       "connect_fee": 0, "initial": 60, "increment": 60, "minimum": 0})
    await client.hset("prepaid:{rates}:deck", "49", rate)  # one hash, no versions
    await client.set("prepaid:{rates}:version", 3)
    store = RateStore(client)
    assert (await store.lookup("4930", NORM)).name == "Germany"
    assert [r.prefix for r in await store.current()] == ["49"]
    report = await store.load(iter_csv(io.StringIO(DECK), "new.csv"))
    assert report.version == 4 and (report.added, report.removed) == (3, 1)
    assert not await client.exists("prepaid:{rates}:deck")
    await client.aclose()


@pytest.mark.parametrize("tail", ["100000007,Again,0.01,0,60,60\n", "99,Bad,0.01,0,60,x\n"])
async def test_a_bad_row_anywhere_leaves_the_active_deck_and_no_staging(redis_url: str,
                                                                        tail: str) -> None:
    client = connect(redis_url)
    store = RateStore(client)
    await store.replace(parse_csv(DECK))
    text = big_deck(12_000) + tail  # the bad row comes after two batches were written
    with pytest.raises(RateError, match=r"big.csv:12002: "):
        await store.load(iter_csv(io.StringIO(text), "big.csv"))
    assert (await store.lookup("353", NORM)).name == "Ireland"
    keys = sorted([k.decode() async for k in client.scan_iter("prepaid:{rates}:deck*")])
    assert keys == ["prepaid:{rates}:deck:1"]
    await client.aclose()


def test_export_round_trips_with_import(run: Run, tmp_path: Path) -> None:
    deck = tmp_path / "rates.csv"
    deck.write_text(HEADER.rstrip("\n") + ",minimum_duration\n"
                    "353,Ireland,0.0123,0,60,60,\n3538,\"Ireland, mobile\",0.000005,0.01,30,6,90\n"
                    "800,Freephone,0,0,60,60,\n")
    assert run("rates", "import", str(deck)).exit_code == 0
    out = run("rates", "export")
    assert out.exit_code == 0
    exported = tmp_path / "exported.csv"
    assert run("rates", "export", str(exported)).exit_code == 0
    assert sorted(exported.read_text().splitlines()) == sorted(out.stdout.splitlines())
    assert sorted(parse_csv(out.stdout), key=repr) == sorted(parse_csv(deck.read_text()),
                                                               key=repr)
    again = run("rates", "import", str(exported), "--json")
    data = json.loads(again.stdout)
    assert (data["added"], data["changed"], data["removed"], data["unchanged"]) == (0, 0, 0, 3)


def test_export_without_a_deck_is_one_line(run: Run, tmp_path: Path) -> None:
    r = run("rates", "export", str(tmp_path / "out.csv"))
    assert r.exit_code == 1 and "no rate deck imported" in r.stderr
    assert not (tmp_path / "out.csv").exists() and not list(tmp_path.glob(".*part"))


def test_dry_run_shows_what_would_change_and_changes_nothing(run: Run, tmp_path: Path) -> None:
    old = tmp_path / "old.csv"
    old.write_text(DECK)
    assert run("rates", "import", str(old)).exit_code == 0
    new = tmp_path / "new.csv"
    new.write_text(HEADER + "353,Ireland,0.0123,0,60,60\n3538,Ireland mobile,0.06,0.01,30,6\n"
                   "49,Germany,0.06,0,60,60\n1,USA,0.01,0,60,60\n")
    r = run("rates", "import", str(new), "--dry-run")
    assert r.exit_code == 0
    assert "2 added, 1 changed, 1 removed, 1 unchanged; nothing imported" in r.stdout
    shown = r.stdout.splitlines()[1:]
    assert sorted(line.split()[0] for line in shown) == ["added", "added", "changed", "removed"]
    assert any(line.split()[:3] == ["removed", "44", "United"] for line in shown)
    assert "United Kingdom" in run("rates", "lookup", "4420").stdout  # still the old deck
    data = json.loads(run("rates", "import", str(new), "--dry-run", "--json").stdout)
    assert data["dry_run"] and data["version"] is None and data["examples"]["changed"] == [
        "3538 Ireland mobile"]
    bad = tmp_path / "bad.csv"
    bad.write_text(DECK + "44,UK again,0.01,0,60,60\n")
    r = run("rates", "import", str(bad), "--dry-run")
    assert r.exit_code == 1 and f"{bad}:5: prefix 44 appears twice" in r.stderr


def test_a_big_import_streams_in_bounded_memory(redis_url: str, tmp_path: Path) -> None:
    """200,000 rows through the console script: its peak memory is that of a small deck."""
    conf = tmp_path / "prepaid.toml"
    conf.write_text(f'[redis]\nurl = "{redis_url}"\n')

    def peak(rows: int) -> int:
        deck = tmp_path / f"deck{rows}.csv"
        deck.write_text(big_deck(rows))
        out = tmp_path / f"out{rows}.txt"
        with out.open("w") as sink:
            proc = subprocess.Popen([str(PROMPT), "--config", str(conf), "rates", "import",
                                     str(deck)], stdout=sink, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, in KiB
            proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 0, out.read_text()
        assert f"imported {rows} rates" in out.read_text()
        return usage.ru_maxrss

    small = peak(1000)
    large = peak(200_000)
    assert large < small + 40_000, (small, large)  # a whole 200k deck in memory is ~200 MB
