"""Ledger changes made side by side share round trips, each with its own reply or error."""

from __future__ import annotations

import asyncio

import pytest

from prepaid.errors import LedgerError
from prepaid.ledger import Ledger
from prepaid.redis_client import connect

EUR = 1_000_000


async def test_changes_of_one_turn_go_in_one_pipeline_each_with_its_own_outcome(
        ledger: Ledger) -> None:
    await ledger.create_account("1001", currency="EUR")
    await ledger.credit("1001", 5 * EUR, key="seed")
    sent = ledger.batch.batches
    # 8 debits of 1 EUR against 5 EUR: five succeed, three are refused, in call order.
    results = await asyncio.gather(
        *(ledger.debit("1001", EUR, key=f"d{i}") for i in range(8)), return_exceptions=True)
    assert ledger.batch.batches - sent == 1
    assert [r.balance if not isinstance(r, BaseException) else r.code  # type: ignore[attr-defined]
            for r in results] == [4 * EUR, 3 * EUR, 2 * EUR, EUR, 0] + ["NO_CREDIT"] * 3
    assert all(isinstance(r, LedgerError) for r in results[5:])
    acct = await ledger.get("1001")
    history = await ledger.history("1001", limit=100)
    assert acct.balance == 0 == sum(e.amount for e in history)
    assert [e.kind for e in history].count("debit") == 5


async def test_a_cancelled_leader_still_sends_the_others(ledger: Ledger) -> None:
    await ledger.create_account("1002", currency="EUR")
    leader = asyncio.ensure_future(ledger.credit("1002", EUR, key="lead"))
    await asyncio.sleep(0)  # the leader queued its change and yields to the others
    others = [asyncio.ensure_future(ledger.credit("1002", EUR, key=f"c{i}")) for i in range(3)]
    leader.cancel()
    done = await asyncio.gather(*others)
    assert [c.balance for c in done][-1] >= 3 * EUR
    assert (await ledger.get("1002")).balance in (3 * EUR, 4 * EUR)  # the leader's may go too
    with pytest.raises(asyncio.CancelledError):
        await leader


async def test_an_outage_reaches_every_caller_of_the_batch(redis_url: str) -> None:
    client = connect("redis://127.0.0.1:1/0", timeout=0.5)  # nothing listens on port 1
    ledger = Ledger(client)
    results = await asyncio.gather(*(ledger.credit("1003", EUR, key=f"k{i}") for i in range(4)),
                                   return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["StoreUnavailable"] * 4
    await client.aclose()
