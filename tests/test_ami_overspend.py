"""Overspend is bounded by the grace: random interleavings of two calls of one account and top-ups.

The pure tracker and the real ledger (Redis) run together; Asterisk is played by the test: it
answers, hangs up, ends a call at its hard limit (``TIMEOUT(absolute)``, as the listener sets
it), obeys a ``Hangup`` action less than one increment later, and posts each call's CDR
(billsec truncated, as Asterisk's) just before its Hangup.
"""

from __future__ import annotations

import asyncio
import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ami_listener.tracker import US
from prepaid.ledger import Ledger
from prepaid.rating import Rate, block_cost, cost
from prepaid.redis_client import connect
from testbed.ami_peer import authorize, open_account, recording_meter
from tests.conftest import assert_verified

T0 = 1_800_000_000 * US
GRACE = 30  # [ami] grace_seconds, the Meter's default
_ids = itertools.count()

rates = st.builds(Rate, prefix=st.just("39"), name=st.just("r"),
                  per_minute=st.integers(0, 1_200_000), connect_fee=st.integers(0, 100_000),
                  initial=st.integers(1, 60), increment=st.integers(1, 60),
                  minimum=st.integers(0, 90))
steps = st.lists(st.tuples(st.sampled_from(["tick"] * 5 + ["answer", "hangup", "topup"]),
                           st.integers(0, 1),
                           st.tuples(st.integers(0, 90), st.integers(0, US - 1)).map(
                               lambda t: t[0] * US + t[1])),
                 min_size=1, max_size=40)


class Asterisk:
    """Collects the listener's AMI actions: a Hangup is obeyed on the next step, a
    TIMEOUT(absolute) ends the call when it runs out."""

    def __init__(self) -> None:
        self.hangups: list[str] = []
        self.now = 0
        self.limits: dict[str, int] = {}  # channel -> when Asterisk hangs it up

    def send(self, name: str, **headers: str) -> str:
        if name == "Hangup":
            self.hangups.append(headers["Channel"])
        elif name == "Setvar" and headers["Variable"] == "TIMEOUT(absolute)":
            self.limits[headers["Channel"]] = self.now + round(float(headers["Value"]) * US)
        return ""


def event(name: str, ref: str, at: int, **extra: str) -> dict[str, str]:
    return {"Event": name, "Uniqueid": ref, "Channel": f"PJSIP/{ref}",
            "Timestamp": f"{at // US}.{at % US:06d}", **extra}


async def scenario(url: str, rate_a: Rate, rate_b: Rate, balance: int,
                   plan: list[tuple[str, int, int]]) -> None:
    client = connect(url)
    ledger = Ledger(client)
    run = next(_ids)
    account = f"acct{run}"
    await open_account(ledger, balance, account)
    ast = Asterisk()
    meter, recorder = recording_meter(ledger, commands=ast, warning_seconds=0)
    rates = [rate_a, rate_b]
    refs = [f"{run}.1", f"{run}.2"]
    state = ["new", "new"]  # new -> dialing -> up -> down
    answered = [0, 0]
    topups = 0
    now = T0

    async def hang(i: int, at: int) -> None:
        ref = refs[i]
        billsec = (at - answered[i]) // US if state[i] == "up" else 0
        await meter.handle(event("Cdr", ref, at, UniqueID=ref, BillableSeconds=str(billsec),
                                 StartTime=str(i)))
        await meter.handle(event("Hangup", ref, at, Cause="16"))
        state[i] = "down"

    try:
        for i, ref in enumerate(refs):
            try:
                await authorize(ledger, ref, f"PJSIP/{ref}", "0039", rates[i], account)
            except Exception:
                state[i] = "denied"  # the AGI refused: no credit for block 1
                continue
            await meter.handle(event("DialBegin", ref, now))
            state[i] = "dialing"
        for op, which, amount in [("answer", 0, 0), ("answer", 1, 0), *plan]:
            for i, ref in enumerate(refs):  # obey cut-offs, within one increment
                if f"PJSIP/{ref}" in ast.hangups and state[i] == "up":
                    lag = min(amount % (rates[i].increment * US), rates[i].increment * US - 1)
                    now += lag
                    ast.now = now
                    await hang(i, now)
            ref = refs[which]
            if op == "tick":
                # Asterisk's own limits run out first, in time order.
                target = now + amount
                for i in sorted(range(2), key=lambda i: ast.limits.get(f"PJSIP/{refs[i]}", 0)):
                    limit = ast.limits.get(f"PJSIP/{refs[i]}")
                    if state[i] == "up" and limit is not None and limit <= target:
                        now = ast.now = max(now, limit)
                        await meter.tick(now)
                        await hang(i, now)
                now = ast.now = target
                await meter.tick(now)
            elif op == "answer" and state[which] == "dialing":
                ast.now = now
                answered[which] = now
                state[which] = "up"
                await meter.handle(event("DialEnd", ref, now, DialStatus="ANSWER"))
            elif op == "hangup" and state[which] in ("dialing", "up"):
                ast.now = now
                await hang(which, now)
            elif op == "topup" and amount >= 100:
                topups += amount // 100
                await ledger.credit(account, amount // 100, key=f"top{run}-{next(_ids)}")
        for i in range(len(refs)):
            if state[i] in ("dialing", "up"):
                now += 1
                ast.now = now
                await hang(i, now)
        acct = await ledger.get(account)
        assert acct.held == 0 and await ledger.holds(account) == {}
        charged = sum(s.cost for s in recorder.settlements)
        assert balance + topups - acct.balance == charged
        for s in recorder.settlements:
            rate = rates[refs.index(s.ref)]
            assert s.cost == cost(rate, s.duration)
        # Ticks up to 90 s apart are a listener away that long: a call it can no longer cut
        # runs until Asterisk's own limit, paid time + grace, and its CDR is owed.
        worst = sum(max(block_cost(r, n) for n in range(1, 200)) * (GRACE // r.increment + 2)
                    for r in rates)
        assert acct.balance >= -worst
        if acct.balance < 0:
            assert any(s.cutoff for s in recorder.settlements)
        assert meter.errors == 0
        await assert_verified(ledger, account)
    finally:
        await client.aclose()


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rate_a=rates, rate_b=rates, balance=st.integers(0, 3_000_000), plan=steps)
def test_no_account_ends_more_than_the_grace_per_call_below_zero(
        redis_url: str, rate_a: Rate, rate_b: Rate, balance: int,
        plan: list[tuple[str, int, int]]) -> None:
    asyncio.run(scenario(redis_url, rate_a, rate_b, balance, plan))
