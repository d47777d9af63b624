"""The mail queue against a real aiosmtpd: outages, exactly-once delivery, templates."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from policy.commands import manual_topup
from policy.mailer import GROUP, MailQueue, Templates, compose
from prepaid.errors import InputError
from prepaid.store import Store, open_store
from tests.test_policy_support import (
    EUR,
    Smtp,
    body,
    mailer,
    make_settings,
    new_account,
    smtp,
    store,
)

__all__ = ["smtp", "store"]  # fixtures


async def test_smtp_down_then_up_delivers_exactly_once(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    late = Smtp()  # nothing listens on its port yet
    st = await open_store(make_settings(redis_url, late.port))
    try:
        await new_account(st, action="none", token="")
        change = await manual_topup(st, "1001", 15 * EUR, "cash-42")
        assert change.balance == 25 * EUR  # the credit does not wait for SMTP
        m = mailer(st)
        with caplog.at_level(logging.INFO, logger="policy.mailer"):
            for _ in range(3):
                assert await m.process_batch() == 0
            assert caplog.text.count("unavailable") == 1
            assert await MailQueue(st.redis).state("manual:1001:cash-42") == "queued"
            late.start()
            assert await m.process_batch() == 1
            assert await m.process_batch() == 0
            assert caplog.text.count("recovered") == 1
        [msg] = late.messages
        assert msg["Subject"] == "Top-up of EUR 15.00 received"
        assert "New balance: EUR 25.00" in body(msg)
        assert "Reference:   cash-42" in body(msg)
        assert await MailQueue(st.redis).state("manual:1001:cash-42") == "sent"
    finally:
        late.stop()
        await st.close()


async def test_a_mail_accepted_before_a_crash_is_not_sent_again(store: Store,
                                                                smtp: Smtp) -> None:
    q = MailQueue(store.redis)
    for n in (1, 2):
        msg = compose(Templates(), "billing@pbx.test", "ann@example.org", "low_balance",
                      _ctx(), f"low:{n}")
        assert await q.enqueue(f"low:{n}", msg)
    dead = mailer(store, "dead")
    await dead.ensure_group()
    # The dead worker took both; it sent mail 1 (the server accepted) and died before XACK.
    await store.redis.xreadgroup(GROUP, "dead", {q.stream_key: ">"}, count=10)
    await store.redis.hset(q.record_key("low:1"), "state", "sent")
    assert await mailer(store, "alive", claim_idle_ms=0).process_batch() == 2
    assert [str(m["Message-ID"]).split("@")[0] for m in smtp.messages] == ["<low.2"]
    assert (await store.redis.xpending(q.stream_key, GROUP))["pending"] == 0


async def test_the_same_mail_id_is_queued_once(store: Store) -> None:
    q = MailQueue(store.redis)
    msg = compose(Templates(), "a@b.test", "c@d.test", "low_balance", _ctx(), "low:x")
    assert await q.enqueue("low:x", msg)
    assert not await q.enqueue("low:x", msg)
    assert await store.redis.xlen(q.stream_key) == 1


async def test_manual_top_up_above_the_maximum_needs_override(store: Store) -> None:
    await new_account(store, action="none", token="")
    with pytest.raises(InputError, match=r"top-up of EUR 100.01 is above the maximum of "
                                         r"EUR 100.00 \(\[policy\] max_topup\); use --override"):
        await manual_topup(store, "1001", 100_010_000, "big")
    assert (await store.ledger.get("1001")).balance == 10 * EUR
    assert (await manual_topup(store, "1001", 150 * EUR, "big", override=True)).balance == (
        160 * EUR)
    again = await manual_topup(store, "1001", 150 * EUR, "big", override=True)
    assert again.duplicate and again.balance == 160 * EUR
    assert await store.redis.xlen(MailQueue(store.redis).stream_key) == 1


class Refusing:
    def __init__(self) -> None:
        self.seen = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.seen += 1
        return "554 5.7.1 message refused"


async def test_a_permanent_refusal_is_given_up_not_retried(redis_url: str) -> None:
    refusing = Refusing()
    server = Smtp(refusing)
    server.start()
    st = await open_store(make_settings(redis_url, server.port))
    try:
        q = MailQueue(st.redis)
        await q.enqueue("low:1", compose(Templates(), "a@b.test", "c@d.test", "low_balance",
                                         _ctx(), "low:1"))
        m = mailer(st, claim_idle_ms=0)
        assert await m.process_batch() == 1
        assert await m.process_batch() == 0
        assert refusing.seen == 1 and await q.state("low:1") == "failed"
    finally:
        server.stop()
        await st.close()


def _ctx(**extra: str) -> dict[str, str]:
    base = {"account": "1001", "currency": "EUR", "balance": "EUR 4.00",
            "threshold": "EUR 5.00", "amount": "EUR 20.00", "card": "visa ending 4242",
            "reference": "r1", "reason": "", "advice": "", "switched": "",
            "time": "2026-01-01 10:00 UTC"}
    base.update(extra)
    return base


def test_messages_have_text_and_escaped_html() -> None:
    msg = compose(Templates(), "a@b.test", "c@d.test", "topup_failed",
                  _ctx(reason="card <declined> & gone"), "fail:1")
    assert msg.get_content_type() == "multipart/alternative"
    assert "Reason: card <declined> & gone" in body(msg)
    assert "card &lt;declined&gt; &amp; gone" in body(msg, "html")


def test_admin_templates_override_the_built_in_ones(tmp_path: Path) -> None:
    (tmp_path / "low_balance.txt").write_text("Subject: Low: $balance\n\nTop up $account now.\n")
    msg = compose(Templates(tmp_path), "a@b.test", "c@d.test", "low_balance", _ctx(), "l")
    assert msg["Subject"] == "Low: EUR 4.00"
    assert body(msg) == "Top up 1001 now.\n"
    assert "<b>1001</b>" in body(msg, "html")  # the HTML part was not overridden


def test_a_broken_override_falls_back_with_one_error(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "low_balance.txt").write_text("Subject: Low $nosuch\n\nx\n")
    with caplog.at_level(logging.ERROR):
        msg = compose(Templates(tmp_path), "a@b.test", "c@d.test", "low_balance", _ctx(), "l")
    assert msg["Subject"] == "Your prepaid balance is low: EUR 4.00"
    assert f"mail template {tmp_path / 'low_balance.txt'}: unknown or bad placeholder" in (
        caplog.text)
