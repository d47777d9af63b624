"""Bounded data (issue 13 part 7) against a real Redis: idempotency keys in daily buckets
that expire after the retry window, and `prepaid archive` moving old history and calls to
monthly files, trimmed from Redis only once on disk, still seen by verify and history."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from prepaid import archive, keys
from prepaid.archive import Archiver, Result, id_key, read
from prepaid.audit import Audit, Mismatch
from prepaid.config import ArchiveSettings, parse
from prepaid.errors import ConfigError
from prepaid.ledger import DAY, Ledger
from prepaid.redis_client import connect
from testbed.ami_peer import wait_until
from testbed.replies import entries
from tests.conftest import Run, cli
from tests.test_verify import healthy, on_ledger

T0 = 1_800_000_000.0  # a fixed wall clock for the idempotency buckets


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def test_a_retry_within_the_window_is_a_duplicate_and_later_is_not(
        redis_url: str) -> None:
    client = connect(redis_url)
    clock = Clock()
    ledger = Ledger(client, idempotency_seconds=10 * DAY, clock=clock)
    try:
        await ledger.create_account("bob", currency="EUR")
        first = await ledger.credit("bob", 500, key="topup-1")
        clock.now += 9 * DAY + 23 * 3600  # nine days and 23 hours later: still a retry
        again = await ledger.credit("bob", 500, key="topup-1")
        assert again.duplicate and again.balance == first.balance == 500
        assert (await ledger.get("bob")).balance == 500
        clock.now = T0 + 11 * DAY  # past the window: the key is forgotten
        late = await ledger.credit("bob", 500, key="topup-1")
        assert not late.duplicate and late.balance == 1000
        # ... which is what verify is there to catch.
        found = [m async for m in Audit(ledger, grace=0).run()]
        assert [m.kind for m in found] == ["idempotency"]
    finally:
        await client.aclose()


async def test_a_refund_reverse_or_admin_top_up_is_never_applied_twice_however_late(
        redis_url: str) -> None:
    """A top-up's refund (and a call's reverse) undoes it once, and an admin's top-up
    (``prepaid topup --reference``) credits once: a retry months later, long after the
    idempotency window, is still a duplicate."""
    client = connect(redis_url)
    clock = Clock()
    ledger = Ledger(client, idempotency_seconds=10 * DAY, clock=clock)
    try:
        await ledger.create_account("carol", currency="EUR")
        await ledger.credit("carol", 900, key="topup:t1")
        first = await ledger.correct("refund", "carol", 900, key="refund:topup:t1", ref="t1",
                                    operator="admin", reason="test")
        await ledger.correct("reverse", "carol", 300, key="reverse:c1", ref="c1",
                             operator="admin", reason="test")
        clock.now = T0 + 90 * DAY  # every bucket of the window has expired long ago
        again = await ledger.correct("refund", "carol", 900, key="refund:topup:t1", ref="t1",
                                     operator="admin", reason="test", force=True)
        back = await ledger.correct("reverse", "carol", 300, key="reverse:c1", ref="c1",
                                    operator="admin", reason="test")
        topup = await ledger.credit("carol", 900, key="topup:t1")  # the admin's retry
        assert again.duplicate and back.duplicate and topup.duplicate
        assert again.entry == first.entry
        assert (await ledger.get("carol")).balance == 300
    finally:
        await client.aclose()


async def test_idempotency_buckets_are_per_day_and_expire(ledger: Ledger) -> None:
    await ledger.create_account("bob", currency="EUR")
    await ledger.credit("bob", 500, key="k1")
    day = int(ledger.clock() // DAY)
    bucket = keys.idempotency_bucket("prepaid", "bob", day)
    assert bucket == "prepaid:{acct:bob}:idem:" + str(day)
    assert await ledger.redis.hexists(bucket, "k1")
    ttl = await ledger.redis.ttl(bucket)
    assert 10 * DAY < ttl <= 11 * DAY  # the window and one bucket
    assert not await ledger.redis.exists(ledger.keys("bob")[3])  # nothing unbucketed
    assert len(ledger.idempotency_buckets("bob")) == 11  # today and the ten days before


async def test_keys_of_the_unbucketed_hash_still_count_and_it_ages_out(
        ledger: Ledger) -> None:
    """An account whose keys an older release kept in one hash: a retry of one of them is
    still a duplicate, and that hash gets the window's expiry at the next change."""
    await ledger.create_account("bob", currency="EUR")
    first = await ledger.credit("bob", 500, key="old-1")
    day = int(ledger.clock() // DAY)
    bucket = keys.idempotency_bucket("prepaid", "bob", day)
    legacy = ledger.keys("bob")[3]
    await ledger.redis.rename(bucket, legacy)  # as an older release left it: no expiry
    await ledger.redis.persist(legacy)
    again = await ledger.credit("bob", 500, key="old-1")
    assert again.duplicate and again.balance == first.balance
    await ledger.debit("bob", 1, key="new-1")
    assert 10 * DAY < await ledger.redis.ttl(legacy) <= 11 * DAY


@pytest.mark.parametrize(("section", "message"), [
    ({"ledger": {"idempotency_days": 3}}, "[ledger] idempotency_days must be 8 to 3650"),
    ({"archive": {"format": "xml"}}, "[archive] format 'xml' must be"),
    ({"archive": {"retention_days": 0}}, "[archive] retention_days must be 1 to 36500"),
])
def test_bad_retention_settings_are_refused(section: dict[str, dict[str, object]],
                                            message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(section, "prepaid.toml")


# -- archive ------------------------------------------------------------------------------

def conf_with_archive(redis_url: str, tmp_path: Path, root: Path) -> Run:
    conf = tmp_path / "archive.toml"
    conf.write_text(f'[redis]\nurl = "{redis_url}"\n[billing]\ncurrency = "EUR"\n'
                    f'[archive]\ndir = "{root}"\n')
    return cli(conf)


async def stream(ledger: Ledger, key: str) -> list[tuple[str, dict[str, str]]]:
    return entries(await ledger.redis.xrange(key))


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def test_archive_writes_monthly_files_trims_and_verify_and_history_still_see_it(
        redis_url: str, tmp_path: Path) -> None:
    root = tmp_path / "arch"
    run = conf_with_archive(redis_url, tmp_path, root)
    on_ledger(redis_url, healthy)
    before: dict[str, list[tuple[str, dict[str, str]]]] = {}

    async def snapshot(lg: Ledger) -> None:
        for a in ("alice", "bob"):
            before[a + ".history"] = await stream(lg, lg.keys(a)[2])
            before[a + ".calls"] = await stream(lg, keys.account_calls("prepaid", a))
    on_ledger(redis_url, snapshot)
    cut = now_iso()

    async def later(lg: Ledger) -> None:  # after the cut: stays in Redis
        await lg.debit("bob", 99, key="after-cut")
    on_ledger(redis_url, later)

    out = run("archive", "--before", cut, "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    n_hist = len(before["alice.history"]) + len(before["bob.history"])
    assert (data["accounts"], data["history"], data["calls"]) == (2, n_hist, 1)
    month = datetime.now(UTC).strftime("%Y-%m")
    assert sorted(Path(p).relative_to(root).as_posix() for p in data["files"]) == [
        f"{month}/alice.calls.jsonl", f"{month}/alice.history.jsonl",
        f"{month}/bob.history.jsonl"]
    # In order, each entry as it was in Redis.
    for name in ("alice.history", "alice.calls", "bob.history"):
        account, what = name.split(".")
        assert list(read(root, account, what)) == before[name], name
    lines = (root / month / "alice.history.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["kind"] == "open"

    async def left(lg: Ledger) -> None:
        assert await stream(lg, lg.keys("alice")[2]) == []
        assert await stream(lg, keys.account_calls("prepaid", "alice")) == []
        [(_, f)] = await stream(lg, lg.keys("bob")[2])
        assert f["key"] == "after-cut"
    on_ledger(redis_url, left)

    for args in ((), ("--no-archive",)):
        out = run("verify", "--grace", "0", *args)
        assert out.exit_code == 0 and "verified 2 accounts" in out.output, (args, out.output)
    shown = json.loads(run("history", "alice", "--json", "--limit", "100").output)
    assert [e["id"] for e in shown] == [i for i, _ in reversed(before["alice.history"])]
    shown = json.loads(run("history", "bob", "--json", "--limit", "2").output)
    assert [e["reference"] for e in shown][0] == ""  # the debit after the cut, from Redis
    assert shown[1]["id"] == before["bob.history"][-1][0]  # then the archive's newest

    # Again: nothing more to move, the files unchanged.
    text = (root / month / "bob.history.jsonl").read_text()
    out = run("archive", "--before", now_iso(), "--json")
    assert json.loads(out.output)["history"] == 1  # only the debit after the first cut
    assert (root / month / "bob.history.jsonl").read_text().startswith(text)
    assert run("verify", "--grace", "0").exit_code == 0

    # A stray HSET is still caught, the archive counted in.
    async def stray(lg: Ledger) -> None:
        await lg.redis.hset(lg.account_key("alice"), "balance", "999000000")
    on_ledger(redis_url, stray)
    out = run("verify", "--grace", "0")
    assert out.exit_code == 1 and "alice: balance: balance is 999000000" in out.output


def test_archive_as_csv_is_read_back(redis_url: str, tmp_path: Path) -> None:
    root = tmp_path / "csv"
    run = conf_with_archive(redis_url, tmp_path, root)
    on_ledger(redis_url, healthy)
    out = run("archive", "--before", now_iso(), "--format", "csv", "--dir", str(root))
    assert out.exit_code == 0 and "history entries and 1 calls of 2 accounts" in out.output
    month = datetime.now(UTC).strftime("%Y-%m")
    head = (root / month / "alice.calls.csv").read_text().splitlines()[0]
    assert head.startswith("id,ref,account,number,prefix,rate,")
    assert run("verify", "--grace", "0").exit_code == 0
    shown = json.loads(run("history", "alice", "--json").output)
    assert shown[-1]["kind"] == "open" and len(shown) >= 3


async def test_a_run_cut_after_the_fsync_writes_nothing_twice(ledger: Ledger,
                                                              tmp_path: Path) -> None:
    await healthy(ledger)
    root = tmp_path / "a"
    cut = int(datetime.now(UTC).timestamp() * 1000) + 1

    class CutBeforeTheMark(Archiver):
        async def _mark_and_trim(self, account: str, stream: str, last: str,
                                 f: dict[str, str] | None) -> None:
            raise ConnectionError("Redis gone after the fsync")

    with pytest.raises(ConnectionError):
        await CutBeforeTheMark(ledger, root).run(cut)
    # The first account's first stream is on disk, nothing is trimmed.
    [written] = list(root.glob("*/*.history.jsonl"))
    account = written.name.split(".")[0]
    assert len(await stream(ledger, ledger.keys(account)[2])) > 0
    with written.open("a") as fh:  # and a torn last line, as a crash mid-write leaves it
        fh.write('{"id":"9')
    result = await Archiver(ledger, root).run(cut)
    assert isinstance(result, Result)
    for a in ("alice", "bob"):
        ids = [i for i, _ in read(root, a, "history")]
        assert len(ids) == len(set(ids)) and ids == sorted(ids, key=lambda i: id_key(i))
        assert await stream(ledger, ledger.keys(a)[2]) == []
    assert not written.read_text().endswith('{"id":"9')
    assert [m async for m in Audit(ledger, grace=0, archive=root).run()] == []


async def test_verify_flags_an_archive_that_is_missing(ledger: Ledger, tmp_path: Path) -> None:
    await healthy(ledger)
    root = tmp_path / "a"
    await Archiver(ledger, root).run(int(datetime.now(UTC).timestamp() * 1000) + 1)
    for f in root.glob("*/bob.history.jsonl"):
        f.unlink()
    found: list[Mismatch] = [m async for m in Audit(ledger, grace=0, archive=root).run("bob")]
    assert [m.kind for m in found] == ["archive"]
    assert "history archived up to" in found[0].detail and "end at nothing" in found[0].detail


@pytest.mark.parametrize(("args", "message"), [
    (("--before", "2026-13-01"), "--before '2026-13-01' is not a date of the calendar"),
    (("--before", "yesterday"), "--before 'yesterday' must be a date like 2026-01-31"),
    (("--before", "2999-01-01"), "--before 2999-01-01 is in the future"),
    (("--format", "xml"), "Invalid value for '--format'"),
])
def test_archive_bad_input_is_one_clear_line_and_trims_nothing(
        run: Run, redis_url: str, tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    on_ledger(redis_url, healthy)
    out = run("archive", "--dir", str(tmp_path / "x"), *args)
    assert out.exit_code != 0 and message in out.output
    assert not (tmp_path / "x").exists()


def test_archive_to_a_file_is_refused_before_anything_is_trimmed(
        run: Run, redis_url: str, tmp_path: Path) -> None:
    on_ledger(redis_url, healthy)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = run("archive", "--before", now_iso(), "--dir", str(blocker))
    assert out.exit_code == 1
    assert out.output.startswith(f"prepaid: error: --dir '{blocker}'")

    async def untouched(lg: Ledger) -> None:
        assert len(await stream(lg, lg.keys("alice")[2])) > 1
    on_ledger(redis_url, untouched)


def test_archive_with_redis_down_is_one_clear_line(tmp_path: Path) -> None:
    conf = tmp_path / "prepaid.toml"
    conf.write_text('[redis]\nurl = "redis://127.0.0.1:1"\n')
    out = cli(conf)("archive", "--dir", str(tmp_path / "a"))
    assert out.exit_code == 1
    assert out.output.startswith("prepaid: error: cannot reach Redis at redis://127.0.0.1:1")


async def test_daily_archive_runs_once_a_day_among_servers(ledger: Ledger,
                                                           tmp_path: Path) -> None:
    await healthy(ledger)
    # retention -1 day: everything up to tomorrow is "old" (the config allows 1 and up).
    settings = ArchiveSettings(retention_days=-1, dir=tmp_path / "d", daily=True)
    stop = asyncio.Event()
    servers = [asyncio.create_task(archive.daily(ledger, settings, stop, every=0.05))
               for _ in range(2)]

    async def trimmed() -> bool:
        return await stream(ledger, ledger.keys("alice")[2]) == []
    await wait_until(trimmed, what="the daily archive")
    await wait_until(lambda: _true(len(list((tmp_path / "d").glob("*/*.jsonl"))) == 3),
                     what="three files")
    stop.set()
    await asyncio.gather(*servers)
    for a in ("alice", "bob"):
        ids = [i for i, _ in read(tmp_path / "d", a, "history")]
        assert ids and len(ids) == len(set(ids))
    day = int(datetime.now(UTC).timestamp() // DAY)
    assert await ledger.redis.ttl(keys.archive_day("prepaid", day)) > DAY


async def test_a_failed_daily_archive_gives_the_day_back(
        ledger: Ledger, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    await healthy(ledger)
    blocker = tmp_path / "file"
    blocker.write_text("")
    settings = ArchiveSettings(retention_days=-1, dir=blocker, daily=True)
    stop = asyncio.Event()
    task = asyncio.create_task(archive.daily(ledger, settings, stop, every=30))

    async def logged() -> bool:
        return any("daily archive to" in r.getMessage() and r.levelname == "ERROR"
                   for r in caplog.records)
    await wait_until(logged, what="the failure logged")
    stop.set()
    await task
    day = int(datetime.now(UTC).timestamp() // DAY)
    assert not await ledger.redis.exists(keys.archive_day("prepaid", day))
    assert len(await stream(ledger, ledger.keys("alice")[2])) > 1  # nothing trimmed


async def _true(value: bool) -> bool:
    return value
