"""Plans on the real Asterisk 22 over real SIP: an account on a non-default plan is charged
its plan's price of the CDR billsec, even when the plan's deck is replaced during the call.

The plan and the account are made with the shell commands an admin types (`prepaid rates
import --plan`, `prepaid account create --plan`) against the bed's config; the calls go
through the shipped dialplan, `prepaid serve` and the far-end SIPp (tests/e2e/
test_sip_billing.py's bed); every charge is checked against cdr_csv's Master.csv.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from prepaid.callrecord import record_key, record_pattern
from prepaid.ratedeck import parse_csv
from prepaid.rating import cost
from prepaid.redis_client import text
from testbed.pbx import Cdr
from testbed.sipload import CallSpec
from tests.conftest import assert_verified
from tests.e2e.test_sip_billing import (
    DECK,
    EUR,
    NUMBER,
    PREPAID,
    RATES_CSV,
    Bed,
    make_bed,
    until,
)

__all__ = ["make_bed"]  # the fixture, used here by name
pytestmark = pytest.mark.pbx

GOLD_CSV = RATES_CSV.replace("4420,SIP 1/1,60.00", "4420,Gold 1/1,30.00")
LATER_CSV = RATES_CSV.replace("4420,SIP 1/1,60.00", "4420,Gold 1/1,240.00")


async def prepaid(bed: Bed, *args: str) -> str:
    done = await asyncio.to_thread(subprocess.run, [PREPAID, "--config", str(bed.config), *args],
                                   capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def answered_call_of(bed: Bed, account: str) -> str | None:
    """The reference of ``account``'s call once its live-call record says answered."""
    async for key in bed.store.redis.scan_iter(record_pattern(bed.settings.redis.key_prefix)):
        who, state = await bed.store.redis.hmget(key, ["account", "state"])
        if who is not None and text(who) == account and state == b"answered":
            return text(key).rsplit(":", 1)[-1]
    return None


async def test_a_gold_account_pays_golds_price_of_its_cdr_even_if_the_deck_changes(
        make_bed: Callable[..., Awaitable[Bed]], tmp_path: Path) -> None:
    bed = await make_bed(["6001", "6002"])
    gold = tmp_path / "gold.csv"
    gold.write_text(GOLD_CSV)
    assert "into plan gold (EUR" in await prepaid(bed, "rates", "import", str(gold),
                                                  "--plan", "gold")
    await prepaid(bed, "account", "create", "6002", "--plan", "gold")
    await bed.store.ledger.credit("6002", 20 * EUR, key="seed:6002", ref="sip seed")
    bed.topups["6002"] = 20 * EUR
    await bed.account("6001", 20 * EUR)  # the default plan: the bed's deck
    await bed.start_serve()
    run = bed.calls([CallSpec("6001", NUMBER["1/1"], 6000), CallSpec("6002", NUMBER["1/1"],
                                                                       6000)], rate=10)
    # While 6002's call is up, gold's deck is replaced by a dearer one.
    ref = await until(lambda: answered_call_of(bed, "6002"), "6002's call answered", 20)
    later = tmp_path / "later.csv"
    later.write_text(LATER_CSV)
    await prepaid(bed, "rates", "import", str(later), "--plan", "gold")
    state = await bed.store.redis.hget(record_key(bed.settings.redis.key_prefix, ref), "state")
    assert state == b"answered", "the call ended before the deck was replaced"
    res = await bed.finish(run)
    assert res.by_end() == {"caller": 2}, (res.by_end(), run.output())

    async def both_cdrs() -> dict[str, Cdr] | None:
        cdrs = bed.dialed_cdrs()
        return cdrs if len(cdrs) == 2 else None

    cdrs = await until(both_cdrs, "2 dialed calls in Master.csv", 15)
    view = await bed.settled(cdrs)
    norm = bed.settings.billing.normalisation
    decks = {"6001": DECK, "6002": parse_csv(GOLD_CSV)}  # gold's deck when it was authorized
    for ref, cdr in cdrs.items():
        assert cdr.answered and cdr.billsec >= 3, cdr
        rate = decks[cdr.accountcode].lookup(cdr.dst, norm)
        assert view.charges[ref] == cost(rate, cdr.billsec), (cdr.accountcode, cdr.billsec)
        assert view.account_of[ref] == cdr.accountcode
    by = {c.accountcode: c.billsec for c in cdrs.values()}
    # 1/1 per second: 1.00/s on the default plan, 0.50/s on gold (4.00/s after the import).
    assert view.balance == {"6001": 20 * EUR - by["6001"] * EUR,
                            "6002": 20 * EUR - by["6002"] * EUR // 2}
    assert view.held == 0
    await assert_verified(bed.store.ledger)
