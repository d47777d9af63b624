"""The ``menu`` AGI route (``*101``): carries out the pure menu of ``agi/menu.py`` over AGI
and against Redis.

Prompts are said with STREAM FILE, SAY NUMBER and SAY DIGITS, each cut short by a key; a
choice is one digit (WAIT FOR DIGIT after the prompts), a PIN is read by GET DATA up to '#'
(the digits come back in the AGI reply only: Read() would put them in a channel variable,
which AMI's VarSet events and the verbose log show). The paying account is the one
Asterisk names (``[agi] account_sources``), never keyed in. A top-up is a request to the
policy worker (``prepaid/selfservice.py``) whose outcome is awaited at most ``[agi]
topup_wait_seconds``; every other Redis step is bounded by ``[agi] timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets

from agi.decision import PROMPT_REFUSED, pick_account
from agi.menu import (
    Ask,
    CheckPin,
    Effect,
    End,
    Load,
    Menu,
    Out,
    SavePin,
    SetAuto,
    TopUp,
    View,
)
from agi.protocol import AgiSession
from agi.speech import Step
from prepaid import pins, selfservice
from prepaid.errors import InputError, StoreUnavailable, UnknownAccount
from prepaid.ledger import check_account_id
from prepaid.outage import OutageLog
from prepaid.store import Store

log = logging.getLogger(__name__)

ESCAPE = "0123456789*#"
DIGIT_TIMEOUT_MS = 6000  # for the first key after the prompts, and between PIN digits
_GET_DATA = re.compile(r"result=([0-9*#]*)")


async def say(session: AgiSession, steps: tuple[Step, ...], escape: str = ESCAPE) -> str:
    """Say the steps in order; the key that cut them short ('' if none)."""
    verbs = {"file": "STREAM FILE", "number": "SAY NUMBER", "digits": "SAY DIGITS"}
    for kind, value in steps:
        reply = await session.command(f'{verbs[kind]} {value} "{escape}"')
        if reply.result > 0:
            return chr(reply.result)
    return ""


async def collect(session: AgiSession, ask: Ask) -> str:
    """The caller's answer to ``ask``: one key, or a PIN up to '#' ('' when none came)."""
    if not ask.pin:
        key = await say(session, ask.speech)
        if not key:
            reply = await session.command(f"WAIT FOR DIGIT {DIGIT_TIMEOUT_MS}")
            key = chr(reply.result) if reply.result > 0 else ""
        return key
    *before, last = ask.speech
    await say(session, tuple(before), "")
    # A slow caller may take the digit time-out for each key: the reply comes after that.
    reply = await session.command(f"GET DATA {last[1]} {DIGIT_TIMEOUT_MS} {ask.digits}",
                                  wait=(ask.digits + 1) * DIGIT_TIMEOUT_MS / 1000)
    m = _GET_DATA.search(reply.line)
    return m.group(1) if m else ""


class Caller:
    """One call in the menu: its account, the store, and the effects run for it."""

    def __init__(self, session: AgiSession, store: Store, account: str) -> None:
        self.session, self.store, self.account = session, store, account
        self.ledger = store.ledger
        self.settings = store.settings
        self.requests = 0
        ref = session.env.get("agi_uniqueid", "").strip()
        self.ref = ref if re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", ref) else "ivr"

    async def run(self, menu: Menu, outage: OutageLog) -> None:
        out: Out = menu.start()
        while not isinstance(out, End):
            if isinstance(out, Ask):
                out = menu.keyed(await collect(self.session, out))
                continue
            await say(self.session, out.speech, "")
            try:
                out = await self.effect(menu, out.effect)
                outage.success()
            except (StoreUnavailable, TimeoutError) as exc:
                outage.failure(exc if not isinstance(exc, TimeoutError) else TimeoutError(
                    f"no answer within {self.settings.agi.timeout:g} s"))
                out = End((("file", PROMPT_REFUSED),))
        await say(self.session, out.speech, "")

    async def effect(self, menu: Menu, effect: Effect) -> Out:
        bound = self.settings.agi.timeout
        if isinstance(effect, TopUp):
            return menu.topped_up(await self.topup(effect.amount))
        async with asyncio.timeout(bound):
            if isinstance(effect, Load):
                return menu.loaded(await self.view())
            if isinstance(effect, CheckPin):
                check = await pins.verify_pin(self.ledger, self.account, effect.pin)
                log.info("menu of account %s: PIN %s", self.account, check.value)
                return menu.pin_checked(check)
            if isinstance(effect, SetAuto):
                return menu.auto_set(await self.set_auto(effect.on))
            assert isinstance(effect, SavePin)
            await pins.set_pin(self.ledger, self.account, effect.pin)
            log.info("menu of account %s: PIN changed by the caller", self.account)
            return menu.pin_saved()

    async def view(self) -> View | None:
        try:
            check_account_id(self.account)
            acct = await self.ledger.get(self.account)
        except (InputError, UnknownAccount):
            log.info("menu request for unknown account %r", self.account)
            return None
        return View(acct.currency, acct.balance, acct.threshold, acct.action,
                    acct.policy_enabled, acct.topup_amount, acct.has_card, acct.card_last4,
                    await pins.has_pin(self.ledger, self.account))

    async def set_auto(self, on: bool) -> bool:
        policy = self.settings.policy
        acct = await self.ledger.get(self.account)
        try:
            fields = selfservice.auto_topup_fields(acct, on, threshold=policy.threshold,
                                                   amount=policy.topup_amount,
                                                   max_topup=policy.max_topup)
        except InputError as exc:
            log.info("menu of account %s: automatic top-up not turned on: %s", self.account,
                     exc)
            return False
        await self.ledger.update(self.account, **fields)
        log.info("menu of account %s: automatic top-up turned %s", self.account,
                 "on" if on else "off")
        return True

    async def topup(self, amount: int) -> selfservice.TopupResult:
        self.requests += 1
        key = f"{self.ref}:{self.requests}:{secrets.token_hex(3)}"
        wait = self.settings.agi.topup_wait_seconds
        request = selfservice.TopupRequest(self.account, amount, key, wait)
        async with asyncio.timeout(self.settings.agi.timeout):
            await selfservice.submit(self.ledger, request)
        log.info("menu of account %s: top-up %s of %s micro-units requested", self.account,
                 key, amount)
        async with asyncio.timeout(wait + self.settings.agi.timeout):
            result = await selfservice.wait(self.ledger, request)
        log.info("menu of account %s: top-up %s %s%s", self.account, key, result.state,
                 f" ({result.reason})" if result.reason else "")
        return result


async def account_of(session: AgiSession, store: Store) -> str:
    sources = store.settings.agi.account_sources
    variable = await session.get_variable("PREPAID_ACCOUNT") if "variable" in sources else None
    return pick_account(sources, session.env, variable)


def offered(store: Store) -> tuple[int, ...]:
    """The ``[policy] presets`` a caller may choose: those within ``[policy] max_topup``."""
    policy = store.settings.policy
    return tuple(p for p in policy.presets if 0 < p <= policy.max_topup)


async def menu(session: AgiSession, store: Store, outage: OutageLog) -> None:
    """The self-service menu for the account Asterisk names."""
    account = await account_of(session, store)
    await session.answer()
    await Caller(session, store, account).run(Menu(offered(store)), outage)
