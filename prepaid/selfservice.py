"""Self-service top-ups by phone: the request the IVR menu writes and the result the policy
worker leaves for it.

The AGI service may not import the policy engine (a service imports only the core), so they
meet in Redis: the menu appends a request (kind ``ivr-topup``, an idempotency key of its
own) to the stream ``P:selfservice``, the policy worker charges the stored card with the
rails of automatic top-ups and writes the outcome to the short-lived key
``P:{acct:ID}:selfservice:<key>``, which the menu polls for a bounded time.

That key also decides who goes first, with ``SET NX``: the worker claims it (``charging``)
before it charges; a menu that stops waiting claims it ``abandoned``.  So a request is
charged at most once and the caller is told the truth: either nothing was charged (try
later), or the worker has started and its e-mail will tell.  A request older than its
``wait`` is never started (a menu that died cannot leave one behind to be charged an hour
later); its age is measured on Redis's clock (its stream entry id against ``TIME``), so
clocks that differ between the menu's and the worker's hosts do not matter.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from prepaid import keys
from prepaid.errors import InputError, StoreUnavailable
from prepaid.ledger import Account, Ledger, check_account_id
from prepaid.redis_client import REDIS_ERRORS, text

KIND_TOPUP = "ivr-topup"
RESULT_TTL = 3600  # s: long past any menu's wait and the worker's retries of one request
FINAL = ("credited", "declined", "refused", "failed", "abandoned")
_KEY_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


async def _redis(ledger: Ledger, step: Awaitable[Any]) -> Any:
    try:
        return await step
    except REDIS_ERRORS as exc:
        raise StoreUnavailable(f"Redis at {ledger.url or 'the configured URL'} is "
                               f"unavailable: {exc}") from exc


def requests_key(prefix: str) -> str:
    """The stream the policy worker reads phone requests from (consumer group ``phone``)."""
    return keys.selfservice_requests(prefix)


def result_key(ledger: Ledger, account: str, key: str) -> str:
    return keys.selfservice_result(ledger.prefix, account, key)


def check_key(key: str) -> str:
    if not _KEY_RE.fullmatch(key):
        raise InputError(f"self-service request key {key!r} must be 1-128 letters, digits "
                         "or _.:-")
    return key


@dataclass(frozen=True, slots=True)
class TopupRequest:
    account: str
    amount: int  # micro-units
    key: str  # the request's idempotency key, unique per request
    wait: float  # seconds the menu waits for it: not started once it is older
    written_ms: int = 0  # when Redis appended it (its entry id), once read back

    def fields(self) -> dict[str, str]:
        return {"kind": KIND_TOPUP, "account": self.account, "amount": str(self.amount),
                "key": self.key, "wait": f"{self.wait:.3f}"}


def parse_request(entry_id: str, fields: dict[str, str]) -> TopupRequest:
    """A request entry; InputError names the entry and what is wrong with it."""
    if fields.get("kind") != KIND_TOPUP:
        raise InputError(f"self-service entry {entry_id}: unknown kind {fields.get('kind')!r}")
    try:
        account = check_account_id(fields.get("account", ""))
        key = check_key(fields.get("key", ""))
        amount, wait = int(fields.get("amount", "")), float(fields.get("wait", ""))
        written_ms = int(entry_id.split("-", 1)[0])
    except (InputError, ValueError) as exc:
        raise InputError(f"self-service entry {entry_id}: {exc}") from None
    if amount <= 0:
        raise InputError(f"self-service entry {entry_id}: amount {amount} is not positive")
    return TopupRequest(account, amount, key, wait, written_ms)


@dataclass(frozen=True, slots=True)
class TopupResult:
    """``charging`` (the worker has started), ``abandoned`` (the menu stopped waiting before
    that: nothing is charged), or the outcome: ``credited`` (with the new balance),
    ``declined``, ``refused`` (a safety rail, with the reason) or ``failed``. ``pending`` is
    the menu's own word for a request still charging when it stopped waiting."""

    state: str
    balance: int = 0
    reason: str = ""

    def dumps(self) -> str:
        return json.dumps({"state": self.state, "balance": self.balance, "reason": self.reason})

    @classmethod
    def loads(cls, raw: object) -> TopupResult:
        data = json.loads(text(raw))
        return cls(str(data["state"]), int(data.get("balance", 0)), str(data.get("reason", "")))

    @property
    def final(self) -> bool:
        return self.state in FINAL


async def submit(ledger: Ledger, request: TopupRequest) -> None:
    """Append the request for the policy workers (the stream has a slot of its own)."""
    fields: dict[Any, Any] = request.fields()
    await _redis(ledger, ledger.redis.xadd(requests_key(ledger.prefix), fields))


async def claim(ledger: Ledger, request: TopupRequest, state: str) -> TopupResult | None:
    """Claim the request's outcome key for ``state`` (``charging`` or ``abandoned``); None
    when this side won, else what the other side left there."""
    rkey = result_key(ledger, request.account, request.key)
    mine = TopupResult(state).dumps()
    if await _redis(ledger, ledger.redis.set(rkey, mine, nx=True, ex=RESULT_TTL)):
        return None
    raw = await _redis(ledger, ledger.redis.get(rkey))
    return TopupResult.loads(raw) if raw is not None else TopupResult(state)


async def finish(ledger: Ledger, request: TopupRequest, result: TopupResult) -> None:
    """The worker's outcome, for the menu to read."""
    await _redis(ledger, ledger.redis.set(result_key(ledger, request.account, request.key),
                                        result.dumps(), ex=RESULT_TTL))


async def read(ledger: Ledger, request: TopupRequest) -> TopupResult | None:
    raw = await _redis(ledger, ledger.redis.get(result_key(ledger, request.account,
                                                         request.key)))
    return None if raw is None else TopupResult.loads(raw)


async def expired(ledger: Ledger, request: TopupRequest) -> bool:
    """The request is older than its ``wait`` by Redis's clock (the one its id is from)."""
    seconds, micros = await _redis(ledger, ledger.redis.time())
    return bool(int(seconds) * 1000 + int(micros) // 1000
                > request.written_ms + request.wait * 1000)


async def wait(ledger: Ledger, request: TopupRequest, *, poll: float = 0.1) -> TopupResult:
    """Poll the outcome for ``request.wait`` seconds; then claim it ``abandoned`` (nothing
    will be charged) or, if the worker started already, answer ``pending``."""
    deadline = time.monotonic() + request.wait
    while time.monotonic() < deadline:
        got = await read(ledger, request)
        if got is not None and got.final:
            return got
        await asyncio.sleep(min(poll, max(0.0, deadline - time.monotonic())))
    other = await claim(ledger, request, "abandoned")
    if other is None:
        return TopupResult("abandoned")
    return other if other.final else TopupResult("pending")


def auto_topup_fields(acct: Account, on: bool, *, threshold: int, amount: int,
                      max_topup: int) -> dict[str, str]:
    """The policy fields that turn ``acct``'s automatic top-up on or off (for
    :meth:`Ledger.update`); ``threshold`` and ``amount`` are the defaults (``[policy]``) for
    an account that has none. InputError says why it cannot be turned on."""
    if not on:
        if acct.email and acct.threshold > 0:  # off: back to the low-balance e-mail
            return {"action": "email", "policy_enabled": "1"}
        return {"action": "none", "policy_enabled": "0"}
    if not acct.has_card:
        raise InputError(f"account {acct.id} has no stored card")
    new_threshold = acct.threshold or threshold
    new_amount = acct.topup_amount or amount
    if new_threshold <= 0 or new_amount <= 0:
        raise InputError(f"account {acct.id} has no threshold or top-up amount set")
    if new_amount > max_topup:
        raise InputError(f"account {acct.id}: top-up amount is above [policy] max_topup")
    return {"action": "topup", "policy_enabled": "1", "threshold": str(new_threshold),
            "topup_amount": str(new_amount)}
