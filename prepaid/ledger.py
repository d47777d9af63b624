"""The Redis credit ledger: atomic, idempotent balance changes with a per-account history.

Every change runs ``ledger.lua`` as one server-side script.  All keys of an account
share the hash tag ``{acct:ID}`` so a script touches one cluster slot, on a single Redis,
Sentinel and Redis Cluster alike.  A threshold crossing is written to the account's own
outbox stream by the script and forwarded from there to the shared policy outbox by
:meth:`Ledger.forward_outbox` (see docs/design.md, "The outbox").
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from prepaid import batching, keys, lua
from prepaid.errors import InputError, LedgerError, StoreUnavailable, UnknownAccount
from prepaid.inputs import check_email
from prepaid.money import check_currency, format_amount
from prepaid.outage import OutageLog
from prepaid.ratedeck import DEFAULT_PLAN, check_plan
from prepaid.redis_client import REDIS_ERRORS, RedisClient, mask_url, text

log = logging.getLogger(__name__)

DAY = 86400
IDEMPOTENCY_DAYS = 10  # [ledger] idempotency_days
_ACCOUNT_RE = re.compile(r"[A-Za-z0-9_.+@-]{1,64}")  # fullmatch: "$" allows a newline


# Fields an admin may change without touching money; balance and held are ledger-only.
_SETTABLE = {"email", "status", "threshold", "action", "topup_amount", "policy_enabled",
             "card_token", "card_brand", "card_last4", "card_exp", "declines",
             "decline_until", "pin", "name", "note", "plan"}


def check_account_id(account: str) -> str:
    if not _ACCOUNT_RE.fullmatch(account):
        raise InputError(f"account id {account!r} must be 1-64 letters, digits or _.+@-")
    return account


@dataclass(frozen=True, slots=True)
class Change:
    """What one ledger call left behind."""

    balance: int
    held: int
    entry: str
    crossed: bool
    hold_amount: int
    duplicate: bool

    @property
    def available(self) -> int:
        return self.balance - self.held


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    kind: str
    amount: int
    balance: int
    held: int
    ref: str
    key: str = ""
    operator: str = ""  # corrections (adjust, refund, reverse) carry who made them and why
    reason: str = ""

    @property
    def time(self) -> float:
        return int(self.id.split("-", 1)[0]) / 1000


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    currency: str
    email: str
    status: str
    balance: int
    held: int
    created: float
    threshold: int
    action: str
    topup_amount: int
    policy_enabled: bool
    card_brand: str
    card_last4: str
    card_exp: str
    card_token: str
    # The lifecycle (prepaid account set/suspend/close): who it is, why it is suspended
    # or closed, and since when (0: never closed).
    name: str = ""
    note: str = ""
    status_reason: str = ""
    closed: float = 0.0
    plan: str = DEFAULT_PLAN  # accounts created before plans have none: the default deck's

    @property
    def available(self) -> int:
        return self.balance - self.held

    @property
    def has_card(self) -> bool:
        return bool(self.card_token)

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Account:
        return cls(
            id=h["id"], currency=h.get("currency", ""), email=h.get("email", ""),
            status=h.get("status", "active"), balance=int(h.get("balance", "0")),
            held=int(h.get("held", "0")), created=float(h.get("created", "0")),
            threshold=int(h.get("threshold", "0") or 0), action=h.get("action", "none"),
            topup_amount=int(h.get("topup_amount", "0") or 0),
            policy_enabled=h.get("policy_enabled", "0") == "1",
            card_brand=h.get("card_brand", ""), card_last4=h.get("card_last4", ""),
            card_exp=h.get("card_exp", ""), card_token=h.get("card_token", ""),
            name=h.get("name", ""), note=h.get("note", ""),
            status_reason=h.get("status_reason", ""), closed=float(h.get("closed", "0") or 0),
            plan=h.get("plan") or DEFAULT_PLAN,
        )


def account_json(a: Account) -> dict[str, Any]:
    """An account as the CLI's ``--json`` prints it (``prepaid account``, ``policy``, ``card``)."""
    return {
        "id": a.id, "currency": a.currency, "plan": a.plan, "email": a.email,
        "status": a.status,
        "balance": format_amount(a.balance), "held": format_amount(a.held),
        "available": format_amount(a.available), "balance_micros": a.balance,
        "created": a.created,
        "policy": {"enabled": a.policy_enabled, "action": a.action,
                   "threshold": format_amount(a.threshold),
                   "topup_amount": format_amount(a.topup_amount)},
        "card": ({"brand": a.card_brand, "last4": a.card_last4, "exp": a.card_exp}
                 if a.has_card else None),
        "name": a.name, "note": a.note, "status_reason": a.status_reason,
        "closed": a.closed or None,
    }


class Ledger:
    """Async access to accounts and their balances in one Redis."""

    def __init__(self, client: RedisClient, prefix: str = "prepaid", url: str = "", *,
                 idempotency_seconds: int = IDEMPOTENCY_DAYS * DAY, bucket_seconds: int = DAY,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = client
        self.prefix = prefix
        self.url = mask_url(url)  # only for messages: never with its password
        # A retry within idempotency_seconds is a duplicate; the keys are kept in one hash
        # per bucket_seconds, each expiring after the window (Redis 7.0: no field expiry).
        self.idempotency_seconds = idempotency_seconds
        self.bucket_seconds = bucket_seconds
        self.clock = clock
        self._ledger = client.register_script(lua.LEDGER)
        # Concurrent changes (every live call's block at a tick) share round trips.
        self.batch = batching.of(client)
        self._create = client.register_script(lua.CREATE_ACCOUNT)
        self._update = client.register_script(lua.UPDATE_ACCOUNT)
        self._status = client.register_script(lua.SET_STATUS)
        self._close = client.register_script(lua.CLOSE_ACCOUNT)
        self.forward_outage = OutageLog(log, "Redis (forwarding crossings to the outbox)")

    # -- keys --------------------------------------------------------------
    def account_key(self, account: str) -> str:
        return keys.account(self.prefix, account)

    def keys(self, account: str) -> list[str]:
        return [self.account_key(account),
                *(keys.account_part(self.prefix, account, p) for p in keys.ACCOUNT_PARTS)]

    def idempotency_buckets(self, account: str) -> list[str]:
        """Today's bucket, then the earlier ones a retry within the window may be in."""
        today = int(self.clock() // self.bucket_seconds)
        back = -(-self.idempotency_seconds // self.bucket_seconds)
        return [keys.idempotency_bucket(self.prefix, account, today - i)
                for i in range(back + 1)]

    @property
    def outbox_key(self) -> str:
        """The shared stream the policy workers read (consumer group ``policy``)."""
        return keys.outbox(self.prefix)

    def account_outbox_key(self, account: str) -> str:
        """Where the ledger script leaves a crossing until it is forwarded to the outbox."""
        return keys.account_part(self.prefix, account, "outbox")

    @property
    def index_key(self) -> str:
        return keys.accounts_index(self.prefix)

    # -- errors ------------------------------------------------------------
    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"Redis at {self.url or 'the configured URL'} is unavailable: "
                                   f"{exc}") from exc

    # -- accounts ----------------------------------------------------------
    async def create_account(self, account: str, *, currency: str, email: str = "",
                             threshold: int = 0, action: str = "none",
                             topup_amount: int = 0, plan: str = DEFAULT_PLAN) -> Account:
        """A new account on ``plan``: that the plan's deck is in ``currency`` is the
        caller's to check (prepaid/plans.py)."""
        check_account_id(account)
        check_currency(currency)
        check_email(email)
        check_plan(plan)
        enabled = "1" if action != "none" else "0"
        made = await self._call(self._create(
            keys=[self.account_key(account), self.keys(account)[2]],
            args=[account, currency, email, f"{time.time():.3f}", str(threshold), action,
                  str(topup_amount), enabled, plan]))
        # The index is another slot: a crash before this ZADD leaves an account the index
        # misses, which creating it again (refused, it exists) repairs.
        await self._call(self.redis.zadd(self.index_key, {account: time.time()}, nx=True))
        if not made:
            raise InputError(f"account {account!r} already exists")
        return await self.get(account)

    async def get(self, account: str) -> Account:
        check_account_id(account)
        h = await self._call(self.batch.command("HGETALL", self.account_key(account)))
        if not h:
            raise UnknownAccount(account)
        return Account.from_hash({k.decode(): v.decode() for k, v in h.items()})

    async def update(self, account: str, **values: str) -> Account:
        bad = set(values) - _SETTABLE
        if bad:
            raise ValueError(f"not settable: {', '.join(sorted(bad))}")
        check_account_id(account)
        if "email" in values:
            check_email(values["email"])
        if "plan" in values:
            check_plan(values["plan"])
        args = [x for kv in values.items() for x in kv]
        if not await self._call(self._update(keys=[self.account_key(account)], args=args)):
            raise UnknownAccount(account)
        return await self.get(account)

    async def list_ids(self) -> list[str]:
        ids = await self._call(self.redis.zrange(self.index_key, 0, -1))
        return [i.decode() for i in ids]

    async def each_fields(self, names: list[str], batch: int = 500
                          ) -> AsyncIterator[tuple[str, list[str | None]]]:
        """(account, values of ``names``) of every account, ``batch`` accounts a round trip;
        an account deleted meanwhile is skipped."""
        start = 0
        while True:
            ids = [text(i) for i in await self._call(
                self.redis.zrange(self.index_key, start, start + batch - 1))]
            if not ids:
                return
            pipe = self.redis.pipeline(transaction=False)
            for account in ids:
                pipe.hmget(self.account_key(account), [*names, "id"])
            for account, values in zip(ids, await self._call(pipe.execute()), strict=True):
                if values[-1] is not None:
                    yield account, [None if v is None else text(v) for v in values[:-1]]
            start += batch

    async def history(self, account: str, limit: int = 20) -> list[Entry]:
        """Newest first."""
        await self.get(account)
        rows = await self._call(self.redis.xrevrange(self.keys(account)[2], count=limit))
        return [entry_from(entry_id, f) for entry_id, f in rows]

    async def iter_history(self, account: str, page: int = 500) -> AsyncIterator[Entry]:
        """Every history entry of the account, newest first, read in pages."""
        end = "+"
        while True:
            rows = await self._call(self.redis.xrevrange(self.keys(account)[2], max=end,
                                                         count=page))
            for entry_id, f in rows:
                yield entry_from(entry_id, f)
            if len(rows) < page:
                return
            end = f"({text(rows[-1][0])}"

    async def holds(self, account: str) -> dict[str, int]:
        raw = await self._call(self.redis.hgetall(self.keys(account)[1]))
        return {k.decode(): int(v) for k, v in raw.items()}

    # -- money -------------------------------------------------------------
    async def _apply(self, op: str, account: str, amount: int, *, key: str, ref: str = "",
                     hold: str = "", flags: str = "", extra: tuple[str, ...] = ()) -> Change:
        check_account_id(account)
        if not key:
            raise ValueError("every ledger change needs an idempotency key")
        reply = await self._call(self.batch.script(
            self._ledger, self.keys(account) + self.idempotency_buckets(account),
            [op, key, str(amount), ref, hold, flags, *(extra or ("", "")),
             str(self.idempotency_seconds + self.bucket_seconds)]))
        status = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if status == "NO_ACCOUNT":
            raise UnknownAccount(account)
        if status not in ("OK", "DUP"):
            raise LedgerError(status, _MESSAGES.get(status, status).format(
                account=account, key=key, hold=hold))
        entry = reply[3].decode() if isinstance(reply[3], bytes) else str(reply[3])
        change = Change(int(reply[1]), int(reply[2]), entry, bool(reply[4]), int(reply[5]),
                        status == "DUP")
        if change.crossed:  # also on a retry (DUP): the first try may have died before this
            try:
                await self.forward_outbox(account)
                self.forward_outage.success()
            except StoreUnavailable as exc:
                # The change is made; the crossing waits in the account's outbox for a
                # retry or the policy worker's sweep.
                self.forward_outage.failure(exc)
        return change

    async def sweep_outboxes(self, min_age: float = 5.0, batch: int = 500) -> int:
        """Forward every crossing older than ``min_age`` seconds that is still in an
        account's own outbox (its writer died before forwarding it); returns how many.

        Walks the account index in batches, one pipelined XRANGE per account.
        """
        end = f"{int((time.time() - min_age) * 1000)}"
        moved = start = 0
        while True:
            ids = [text(i) for i in await self._call(
                self.redis.zrange(self.index_key, start, start + batch - 1))]
            if not ids:
                return moved
            pipe = self.redis.pipeline(transaction=False)
            for account in ids:
                pipe.xrange(self.account_outbox_key(account), "-", end, count=1)
            found = await self._call(pipe.execute())
            for account, rows in zip(ids, found, strict=True):
                if rows:
                    moved += await self.forward_outbox(account, min_age)
            start += batch

    async def forward_outbox(self, account: str, min_age: float = 0.0) -> int:
        """Move the crossings waiting in the account's outbox to the shared outbox.

        Each is XADDed to the shared stream, then XDELed here: two steps in two slots, so
        a crash in between forwards it again later, which the policy worker tolerates
        (it acts once per account and crossing id).  ``min_age`` (seconds) leaves recent
        entries to the client that wrote them.  Returns how many were forwarded.
        """
        src = self.account_outbox_key(account)
        end = "+" if min_age <= 0 else f"{int((time.time() - min_age) * 1000)}"
        moved = 0
        while True:
            rows = await self._call(self.redis.xrange(src, "-", end, count=100))
            for entry_id, fields in rows:
                await self._call(self.redis.xadd(self.outbox_key, fields))
                await self._call(self.redis.xdel(src, entry_id))
            moved += len(rows)
            if len(rows) < 100:
                return moved

    async def credit(self, account: str, amount: int, *, key: str, ref: str = "") -> Change:
        return await self._apply("credit", account, amount, key=key, ref=ref)

    async def debit(self, account: str, amount: int, *, key: str, ref: str = "",
                    force: bool = False) -> Change:
        """Take ``amount`` from the available credit; ``force`` lets it go below zero."""
        return await self._apply("debit", account, amount, key=key, ref=ref,
                                 flags="force" if force else "")

    async def reserve(self, account: str, hold: str, amount: int, *, key: str,
                      ref: str = "") -> Change:
        return await self._apply("reserve", account, amount, key=key, ref=ref, hold=hold)

    async def settle(self, account: str, hold: str, amount: int, *, key: str, ref: str = "",
                     force: bool = False) -> Change:
        """Drop the hold and debit ``amount`` in one step."""
        return await self._apply("settle", account, amount, key=key, ref=ref, hold=hold,
                                 flags="force" if force else "")

    async def release(self, account: str, hold: str, *, key: str, ref: str = "") -> Change:
        return await self._apply("release", account, 0, key=key, ref=ref, hold=hold)

    async def correct(self, kind: str, account: str, amount: int, *, key: str, ref: str,
                      operator: str, reason: str, force: bool = False) -> Change:
        """A correction, in history as its own ``kind``: ``adjust`` by a signed amount,
        ``refund`` (takes ``amount`` back) or ``reverse`` (gives ``amount`` back).  One that
        would take the balance below zero is refused (BELOW_ZERO) unless ``force``."""
        if kind not in CORRECTIONS:
            raise ValueError(f"not a correction: {kind}")
        return await self._apply(kind, account, amount, key=key, ref=ref,
                                 flags="force" if force else "", extra=(operator, reason))

    # -- the lifecycle ---------------------------------------------------------
    async def set_status(self, account: str, status: str, reason: str = "") -> Account:
        """Suspend (``reason`` kept and shown) or resume; a closed account stays closed."""
        if status not in ("active", "suspended"):
            raise ValueError(f"not a status to set: {status}")
        check_account_id(account)
        got = text(await self._call(self._status(
            keys=[self.account_key(account)], args=[status, reason, f"{time.time():.3f}"])))
        if got == "NO_ACCOUNT":
            raise UnknownAccount(account)
        if got == "CLOSED":
            raise LedgerError("CLOSED", f"account {account!r} is closed")
        return await self.get(account)

    async def close(self, account: str, *, operator: str, reason: str,
                    force: bool = False) -> tuple[Account, bool]:
        """Close the account for good: refused (BALANCE, LIVE) while its balance is not zero
        or it holds credit for live calls, unless ``force``.  Its keys and history stay, so
        the id is never created again.  Returns the account and whether it was closed
        before (then nothing changed)."""
        check_account_id(account)
        reply = await self._call(self._close(
            keys=self.keys(account)[:3],
            args=["force" if force else "", operator, reason, f"{time.time():.3f}"]))
        got = text(reply[0])
        if got == "NO_ACCOUNT":
            raise UnknownAccount(account)
        if got == "BALANCE":
            raise LedgerError(got, f"account {account!r} has a balance of "
                              f"{format_amount(int(reply[1]))}; bring it to zero (prepaid "
                              "adjust, refund) or close it with --force")
        if got == "LIVE":
            raise LedgerError(got, f"account {account!r} has {int(reply[1])} live call(s) "
                              "holding credit; close it when they end, or with --force")
        return await self.get(account), got == "CLOSED"


CORRECTIONS = ("adjust", "refund", "reverse")


def entry_from(entry_id: bytes, f: dict[bytes, bytes]) -> Entry:
    d = {k.decode(): v.decode() for k, v in f.items()}
    return Entry(entry_id.decode(), d["kind"], int(d["amount"]), int(d["balance"]),
                 int(d["held"]), d.get("ref", ""), d.get("key", ""), d.get("operator", ""),
                 d.get("reason", ""))


_MESSAGES = {
    "NO_CREDIT": "account {account!r} has too little available credit",
    "SUSPENDED": "account {account!r} is suspended",
    "HOLD_EXISTS": "hold {hold!r} already exists on account {account!r}",
    "NO_HOLD": "account {account!r} has no hold {hold!r}",
    "IDEM_CONFLICT": "idempotency key {key!r} was already used for a different change",
    "BAD_AMOUNT": "amount must be a positive number of micro-units",
    "OVERFLOW": "balance of {account!r} would be too large",
    "BELOW_ZERO": "this would take the balance of {account!r} below zero; use --force to allow it",
}
