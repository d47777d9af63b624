"""Plans (a rate deck per customer group) and the accounts on them: one currency each.

An account's currency must be its plan's deck's. Nothing converts: an account put on a plan
in another currency is refused (``account create/set --plan``), so is a deck whose currency
differs from accounts already on its plan (``rates import``), and a call of an account whose
plan's deck is in another currency (authorization, a race of the two, refuses it).
"""

from __future__ import annotations

from prepaid.errors import InputError
from prepaid.ratedeck import DEFAULT_PLAN, check_plan
from prepaid.store import Store

SHOWN = 3  # accounts a refusal names


async def currency_of(store: Store, plan: str, what: str = "--plan") -> str:
    """The currency of ``plan``'s deck, for an account to be put on it. The configured default
    plan may have no deck yet (its calls are refused until it has): ``[billing] currency``.
    Any other plan without a deck is refused."""
    check_plan(plan, what)
    found = await store.rates.plan_currency(plan)
    if found is not None:
        return found
    if plan in (store.settings.billing.default_plan, DEFAULT_PLAN):
        return store.settings.billing.currency
    raise InputError(f"{what} {plan!r}: no such plan; import its rate deck first "
                     f"('prepaid rates import FILE --plan {plan}')")


def check_match(plan: str, plan_currency: str, currency: str, what: str) -> None:
    if plan_currency != currency:
        raise InputError(f"{what}: plan {plan!r} is rated in {plan_currency}, not {currency}; "
                         "an account's currency must be its plan's (nothing is converted)")


async def others_on(store: Store, plan: str, currency: str) -> list[tuple[str, str]]:
    """(account, currency) of the accounts on ``plan`` whose currency is not ``currency``:
    every account is read, in batches (only when a plan's currency would change)."""
    out = []
    async for account, (on, cur) in store.ledger.each_fields(["plan", "currency"]):
        if (on or DEFAULT_PLAN) == plan and cur != currency:
            out.append((account, cur or ""))
    return out


async def check_import(store: Store, plan: str, currency: str) -> None:
    """Refuse a deck for ``plan`` in ``currency`` when accounts on the plan have another."""
    now = await store.rates.plan_currency(plan) or store.settings.billing.currency
    if now == currency:
        return
    found = await others_on(store, plan, currency)
    if found:
        shown = ", ".join(f"{a} ({c})" for a, c in found[:SHOWN])
        more = f" and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
        raise InputError(f"--currency {currency}: plan {plan!r} has {len(found)} account(s) "
                         f"in another currency: {shown}{more}; move them to another plan "
                         "first ('prepaid account set ACCOUNT --plan PLAN'), nothing is "
                         "converted")
