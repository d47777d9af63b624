"""An event that keeps failing is parked in the dead-letter stream (issue 11, part 4).

Real Redis, a real SMTP server, the policy and mail workers' own run loops: an account
whose stored e-mail address holds a line break (written before addresses were checked, or
by hand) makes the low-balance warning raise on every try. The workers go on with the other
accounts' events; after ``[policy] dead_letter_after`` tries the event is parked, acked in
the outbox, logged once and counted; the admin fixes the address and ``prepaid dead-letters
retry`` makes it succeed, once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from prometheus_client import REGISTRY

from policy.worker import GROUP
from prepaid import keys
from prepaid.store import Store, open_store
from tests.conftest import Run, cli
from tests.test_policy_support import EUR, Smtp, mailer, make_settings, new_account, smtp, worker

__all__ = ["smtp"]  # fixtures

TRIES = 3
BAD = "erin@example.org\nBcc: spam@example.net"


@pytest.fixture
async def st(redis_url: str, smtp: Smtp) -> AsyncIterator[Store]:
    store = await open_store(make_settings(redis_url, smtp.port, dead_letter_after=TRIES))
    yield store
    await store.close()


@pytest.fixture
def run(st: Store, tmp_path: Path) -> Run:
    conf = tmp_path / "prepaid.toml"
    conf.write_text(f'[redis]\nurl = "{st.settings.redis.url}"\n'
                    f'[policy]\ndead_letter_after = {TRIES}\n')
    return cli(conf)


async def until(check: Callable[[], Awaitable[Any]], what: str, within: float = 15.0) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while not (value := await check()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return value


def letters(run: Run) -> list[dict[str, Any]]:
    res = run("dead-letters", "--json")
    assert res.exit_code == 0, res.output
    out: list[dict[str, Any]] = json.loads(res.stdout)
    return out


def refused(res: Result, *words: str) -> None:
    assert res.exit_code == 1 and res.stdout == "", res.output
    [line] = res.stderr.strip().splitlines()
    assert line.startswith("prepaid: error: "), line
    for word in words:
        assert word in line, line


def parked_count(stream: str = "outbox") -> float:
    return REGISTRY.get_sample_value("prepaid_dead_letters_total", {"stream": stream}) or 0.0


async def bad_account(st: Store, account: str) -> None:
    await new_account(st, account, action="email", token="")
    await st.redis.hset(keys.account(st.ledger.prefix, account), "email", BAD)


async def pending(st: Store) -> int:
    info = await st.redis.xpending(st.ledger.outbox_key, GROUP)
    return int(info["pending"])


async def test_a_failing_event_is_parked_and_retried_once_after_the_fix(
        st: Store, smtp: Smtp, run: Run, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    before = parked_count()
    await bad_account(st, "2001")
    await new_account(st, "2002", action="email", token="", email="bob@example.org")
    await st.ledger.debit("2001", 6 * EUR, key="d1")  # crosses first: ahead in the outbox
    await st.ledger.debit("2002", 6 * EUR, key="d2")

    stop = asyncio.Event()
    w = worker(st, claim_idle_ms=50, dead_letter_after=TRIES)
    tasks = [asyncio.create_task(w.run(stop, block_ms=20)),
             asyncio.create_task(mailer(st).run(stop, block_ms=20))]
    try:
        # The other account is served while the bad event fails.
        await until(lambda: asyncio.sleep(0, [m for m in smtp.messages
                                              if m["To"] == "bob@example.org"]), "bob's mail")
        [letter] = await until(lambda: asyncio.to_thread(letters, run), "the dead letter")
        assert letter["stream"] == st.ledger.outbox_key and letter["group"] == GROUP
        assert letter["account"] == "2001" and letter["attempts"] == TRIES
        assert "linefeed" in letter["error"] and "\n" not in letter["error"]
        assert letter["fields"]["account"] == "2001" and letter["fields"]["crossing"]
        assert await pending(st) == 0  # acknowledged in the outbox: never delivered again
        assert parked_count() == before + 1
        status = json.loads((await asyncio.to_thread(run, "status", "--json")).stdout)
        assert status["dead_letters"] == {
            "state": "waiting",
            "detail": "1 event(s) parked after failing; see 'prepaid dead-letters'"}
        parked_lines = [r for r in caplog.records if f"failed {TRIES} times; parked" in r.message]
        assert len(parked_lines) == 1 and parked_lines[0].levelno == logging.ERROR
        tracebacks = [r for r in caplog.records if r.exc_info]
        assert len(tracebacks) == 1  # the first failure only
        assert all(not t.done() for t in tasks)  # the workers never stopped

        # Bad input: one line, nothing changed.
        outbox = await st.redis.xlen(st.ledger.outbox_key)
        for args, words in [((), ("one dead letter id or --all",)),
                            ((letter["id"], "--all"), ("one dead letter id or --all",)),
                            (("nonsense",), ("'nonsense'", "must look like")),
                            (("1-0",), ("no dead letter 1-0",)),
                            ((f"{letter['id']}\n",), ("must look like",))]:
            refused(await asyncio.to_thread(run, "dead-letters", "retry", *args), *words)
        for bad, word in [("nonsense", "must look like"), ("1-0", "no dead letter 1-0"),
                          (f"{letter['id']}\n", "must look like")]:
            refused(await asyncio.to_thread(run, "dead-letters", "drop", bad), word)
        assert await asyncio.to_thread(letters, run) == [letter]
        assert await st.redis.xlen(st.ledger.outbox_key) == outbox

        # The admin fixes the address and retries: the warning goes out, once.
        res = await asyncio.to_thread(run, "policy", "2001", "--email", "erin@example.org")
        assert res.exit_code == 0, res.output
        res = await asyncio.to_thread(run, "dead-letters", "retry", letter["id"])
        assert res.exit_code == 0 and f"dead letter {letter['id']} put back" in res.stdout
        [mail] = await until(lambda: asyncio.sleep(0, [m for m in smtp.messages
                                                       if m["To"] == "erin@example.org"]),
                             "the fixed account's mail")
        assert mail["Subject"] == "Your prepaid balance is low: EUR 4.00"
        assert await asyncio.to_thread(letters, run) == []
        status = json.loads((await asyncio.to_thread(run, "status", "--json")).stdout)
        assert status["dead_letters"]["state"] == "none"
        refused(await asyncio.to_thread(run, "dead-letters", "retry", letter["id"]),
                f"no dead letter {letter['id']}")
        await until(lambda: _idle(st), "the outbox drained")
        assert parked_count() == before + 1
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert [m["To"] for m in smtp.messages].count("erin@example.org") == 1
    assert [m["To"] for m in smtp.messages].count("bob@example.org") == 1
    assert "erin@example.org\n" not in "".join(str(m["To"]) for m in smtp.messages)


async def _idle(st: Store) -> bool:
    return await pending(st) == 0


async def test_retry_all_and_drop(st: Store, smtp: Smtp, run: Run) -> None:
    for account in ("3001", "3002", "3003"):
        await bad_account(st, account)
        await st.ledger.debit(account, 6 * EUR, key=f"d{account}")
    w = worker(st, claim_idle_ms=0, dead_letter_after=TRIES)
    for _ in range(TRIES):
        await w.process_batch()
    got = await asyncio.to_thread(letters, run)
    assert sorted(x["account"] for x in got) == ["3001", "3002", "3003"]
    assert await pending(st) == 0

    plain = await asyncio.to_thread(run, "dead-letters")
    assert plain.exit_code == 0 and "3002" in plain.stdout and "linefeed" in plain.stdout
    drop = next(x for x in got if x["account"] == "3003")
    res = await asyncio.to_thread(run, "dead-letters", "drop", drop["id"])
    assert res.exit_code == 0 and "dropped" in res.stdout
    refused(await asyncio.to_thread(run, "dead-letters", "drop", drop["id"]), "no dead letter")

    for account in ("3001", "3002"):
        assert (await asyncio.to_thread(run, "policy", account, "--email",
                                        f"u{account}@example.org")).exit_code == 0
    res = await asyncio.to_thread(run, "dead-letters", "retry", "--all", "--json")
    assert res.exit_code == 0, res.output
    assert sorted(x["source_id"] for x in json.loads(res.stdout)) == sorted(
        x["source_id"] for x in got if x["account"] != "3003")
    assert await asyncio.to_thread(letters, run) == []
    assert await w.process_batch() == 2
    assert await mailer(st).process_batch() == 2
    assert sorted(str(m["To"]) for m in smtp.messages) == ["u3001@example.org",
                                                          "u3002@example.org"]
    assert (await asyncio.to_thread(run, "dead-letters", "retry", "--all")).stdout == (
        "no dead letters\n")


async def test_an_event_that_succeeds_on_a_later_try_is_not_parked(st: Store,
                                                                   smtp: Smtp) -> None:
    await bad_account(st, "4001")
    await st.ledger.debit("4001", 6 * EUR, key="d1")
    w = worker(st, claim_idle_ms=0, dead_letter_after=TRIES)
    for _ in range(TRIES - 1):
        assert await w.process_batch() == 0
    await st.ledger.update("4001", email="fixed@example.org")
    assert await w.process_batch() == 1
    assert await st.redis.xlen(keys.dead_letters(st.ledger.prefix)) == 0
    assert not await st.redis.keys(f"{keys.dead_letters(st.ledger.prefix)}:attempts:*")


def test_dead_letter_after_is_checked(tmp_path: Path) -> None:
    from prepaid.config import parse
    from prepaid.errors import ConfigError

    assert parse({}, env={}).policy.dead_letter_after == 5
    with pytest.raises(ConfigError, match=r"\[policy\] dead_letter_after must be at least 1"):
        parse({"policy": {"dead_letter_after": 0}}, env={})


async def test_prepaid_serve_keeps_its_policy_service_up_through_a_bad_record(
        st: Store, smtp: Smtp, tmp_path: Path) -> None:
    """The reproduction of the issue, on the real ``prepaid serve``: the policy service used
    to die on the event and die again on every restart; now the same process serves on."""
    from testbed.servers import free_port
    from tests.test_serve import Serve, gone, spawn_serve

    await bad_account(st, "2001")
    await new_account(st, "2002", action="email", token="", email="bob@example.org")
    await st.ledger.debit("2001", 6 * EUR, key="d1")
    await st.ledger.debit("2002", 6 * EUR, key="d2")
    conf = tmp_path / "serve.toml"
    conf.write_text(f'[redis]\nurl = "{st.settings.redis.url}"\n'
                    f'[agi]\nlisten = "127.0.0.1:{free_port()}"\nallow_unmetered = true\n'
                    f'[ami]\nport = {free_port()}\nreconnect_max_seconds = 1.0\n'
                    f'[smtp]\nhost = "127.0.0.1"\nport = {smtp.port}\n'
                    f'from = "billing@pbx.test"\n'
                    f'[policy]\ndead_letter_after = {TRIES}\nclaim_idle_seconds = 0.2\n')
    run = cli(conf)
    log = tmp_path / "serve.log"
    proc = spawn_serve(conf, log)
    s = Serve(proc, log, 0, None)
    try:
        kids = await s.started({"policy": 1})
        await until(lambda: asyncio.sleep(0, [m for m in smtp.messages
                                              if m["To"] == "bob@example.org"]), "bob's mail")
        [letter] = await until(lambda: asyncio.to_thread(letters, run), "the dead letter")
        assert letter["account"] == "2001" and letter["attempts"] == TRIES
        assert (await asyncio.to_thread(run, "policy", "2001", "--email",
                                        "erin@example.org")).exit_code == 0
        assert (await asyncio.to_thread(run, "dead-letters", "retry", letter["id"])).exit_code == 0
        await until(lambda: asyncio.sleep(0, [m for m in smtp.messages
                                              if m["To"] == "erin@example.org"]), "erin's mail")
        assert s.children()["policy"] == kids["policy"]  # never restarted
        text = s.text()
        assert text.count(f"failed {TRIES} times; parked in the dead-letter stream") == 1
        assert "restarting it" not in text
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for pids in s.children().values():
            for pid in pids:
                if not gone(pid):
                    os.kill(pid, signal.SIGKILL)
    assert [m["To"] for m in smtp.messages].count("erin@example.org") == 1


async def test_a_mail_that_cannot_be_sent_is_parked_but_an_smtp_outage_never_counts(
        st: Store, smtp: Smtp, run: Run) -> None:
    from policy.mailer import MailQueue

    stream = MailQueue(st.redis, st.ledger.prefix).stream_key
    # A queue entry written by a bug or by hand: no From header, so sending raises.
    await st.redis.xadd(stream, {"id": "low:9:1-0", "message": b"Subject: x\r\n\r\nbody"})
    await new_account(st, "2002", action="email", token="", email="bob@example.org")
    await st.ledger.debit("2002", 6 * EUR, key="d2")
    assert await worker(st).process_batch() == 1
    m = mailer(st, dead_letter_after=TRIES)
    smtp.stop()
    for _ in range(3 * TRIES):  # SMTP away: both mails wait, neither is counted
        assert await m.process_batch() == 0
    assert await asyncio.to_thread(letters, run) == []
    smtp.start()
    assert await m.process_batch() == 1  # bob's goes out; the bad one fails (1)
    assert [str(x["To"]) for x in smtp.messages] == ["bob@example.org"]
    for _ in range(TRIES - 1):
        await m.process_batch()
    [letter] = await asyncio.to_thread(letters, run)
    assert letter["stream"] == stream and letter["group"] == "mailers"
    assert letter["fields"]["id"] == "low:9:1-0" and "From" in letter["error"]
    assert int((await st.redis.xpending(stream, "mailers"))["pending"]) == 0
    assert parked_count("{mail}") >= 1
    res = await asyncio.to_thread(run, "dead-letters", "drop", letter["id"])
    assert res.exit_code == 0, res.output
    assert await asyncio.to_thread(letters, run) == []
    assert await m.process_batch() == 0 and len(smtp.messages) == 1
