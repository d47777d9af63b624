from __future__ import annotations

import asyncio

import pytest

from prepaid.errors import InputError, LedgerError, UnknownAccount
from prepaid.ledger import Ledger

EUR = 1_000_000


async def history_sum(ledger: Ledger, account: str) -> int:
    return sum(e.amount for e in await ledger.history(account, limit=10_000))


async def test_new_account_starts_at_zero_with_an_open_entry(ledger: Ledger) -> None:
    acct = await ledger.create_account("1001", currency="EUR", email="a@example.org")
    assert (acct.balance, acct.held, acct.status) == (0, 0, "active")
    [entry] = await ledger.history("1001")
    assert (entry.kind, entry.amount) == ("open", 0)


async def test_duplicate_account_is_refused(ledger: Ledger) -> None:
    await ledger.create_account("1001", currency="EUR")
    with pytest.raises(InputError, match="already exists"):
        await ledger.create_account("1001", currency="USD")
    assert (await ledger.get("1001")).currency == "EUR"


async def test_credit_then_debit_changes_balance_and_history(ledger: Ledger) -> None:
    await ledger.create_account("a", currency="EUR")
    c = await ledger.credit("a", 10 * EUR, key="t1", ref="card")
    assert c.balance == 10 * EUR and not c.duplicate
    d = await ledger.debit("a", 1_234_567, key="d1", ref="call")
    assert d.balance == 10 * EUR - 1_234_567
    kinds = [(e.kind, e.amount, e.balance) for e in await ledger.history("a")]
    assert kinds[:2] == [("debit", -1_234_567, 8_765_433), ("credit", 10 * EUR, 10 * EUR)]


async def test_same_key_twice_changes_nothing_and_returns_first_result(ledger: Ledger) -> None:
    await ledger.create_account("a", currency="EUR")
    first = await ledger.credit("a", 5 * EUR, key="k")
    again = await ledger.credit("a", 5 * EUR, key="k")
    assert again.duplicate and again.balance == first.balance == 5 * EUR
    assert again.entry == first.entry
    assert (await ledger.get("a")).balance == 5 * EUR
    assert len(await ledger.history("a")) == 2


async def test_same_key_for_a_different_change_is_refused(ledger: Ledger) -> None:
    await ledger.create_account("a", currency="EUR")
    await ledger.credit("a", 5 * EUR, key="k")
    with pytest.raises(LedgerError) as err:
        await ledger.credit("a", 6 * EUR, key="k")
    assert err.value.code == "IDEM_CONFLICT"
    assert (await ledger.get("a")).balance == 5 * EUR


async def test_debit_beyond_available_is_refused_and_changes_nothing(ledger: Ledger) -> None:
    await ledger.create_account("a", currency="EUR")
    await ledger.credit("a", 1 * EUR, key="c")
    with pytest.raises(LedgerError) as err:
        await ledger.debit("a", 1 * EUR + 1, key="d")
    assert err.value.code == "NO_CREDIT"
    assert (await ledger.get("a")).balance == 1 * EUR
    # a refused change did not burn its key: it can succeed later
    await ledger.credit("a", 1, key="c2")
    assert (await ledger.debit("a", 1 * EUR + 1, key="d")).balance == 0


async def test_reserve_settle_release(ledger: Ledger) -> None:
    await ledger.create_account("a", currency="EUR")
    await ledger.credit("a", 2 * EUR, key="c")
    r = await ledger.reserve("a", "call-1", 1_500_000, key="r1")
    assert (r.balance, r.held, r.available) == (2 * EUR, 1_500_000, 500_000)
    with pytest.raises(LedgerError) as err:
        await ledger.reserve("a", "call-2", 600_000, key="r2")
    assert err.value.code == "NO_CREDIT"
    s = await ledger.settle("a", "call-1", 700_000, key="s1")
    assert (s.balance, s.held, s.hold_amount) == (1_300_000, 0, 1_500_000)
    await ledger.reserve("a", "call-3", 300_000, key="r3")
    rel = await ledger.release("a", "call-3", key="x3")
    assert (rel.balance, rel.held) == (1_300_000, 0)
    with pytest.raises(LedgerError) as err2:
        await ledger.release("a", "call-3", key="x3b")
    assert err2.value.code == "NO_HOLD"
    assert await history_sum(ledger, "a") == 1_300_000


async def test_suspended_account_cannot_reserve(ledger: Ledger) -> None:
    await ledger.create_account("a", currency="EUR")
    await ledger.credit("a", 2 * EUR, key="c")
    await ledger.update("a", status="suspended")
    with pytest.raises(LedgerError) as err:
        await ledger.reserve("a", "h", 1, key="r")
    assert err.value.code == "SUSPENDED"


async def test_unknown_account(ledger: Ledger) -> None:
    with pytest.raises(UnknownAccount):
        await ledger.credit("nobody", 1, key="k")
    with pytest.raises(UnknownAccount):
        await ledger.get("nobody")


async def test_scripts_survive_a_script_cache_flush(ledger: Ledger) -> None:
    await ledger.create_account("a", currency="EUR")
    await ledger.credit("a", 1, key="1")
    await ledger.redis.script_flush()  # what a Redis restart does to EVALSHA
    assert (await ledger.credit("a", 1, key="2")).balance == 2


async def test_fifty_concurrent_spenders_never_overdraw(ledger: Ledger) -> None:
    await ledger.create_account("a", currency="EUR")
    await ledger.credit("a", 1 * EUR, key="c")
    price = 70_000  # 50 x 0.07 = 3.50 wanted, 1.00 there

    async def spend(i: int) -> bool:
        try:
            if i % 2:
                await ledger.debit("a", price, key=f"d{i}")
            else:
                await ledger.reserve("a", f"h{i}", price, key=f"r{i}")
            return True
        except LedgerError as exc:
            assert exc.code == "NO_CREDIT"
            return False

    done = await asyncio.gather(*(spend(i) for i in range(50)))
    acct = await ledger.get("a")
    assert sum(done) == 1 * EUR // price  # 14 fit, the rest were refused
    assert acct.available == 1 * EUR - 14 * price >= 0
    assert await history_sum(ledger, "a") == acct.balance
    holds = await ledger.holds("a")
    assert sum(holds.values()) == acct.held
