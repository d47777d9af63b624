"""Corrections an admin makes by hand: adjust a balance, refund a top-up, reverse a call.

Each is one ledger change (:meth:`Ledger.correct`, one Lua script) with an idempotency key
and a history entry of its own kind carrying the operator and the reason:

- ``adjust``: a signed amount; key ``adjust:<reference>``;
- ``refund``: takes back the credit of one top-up; key ``refund:<the top-up's key>``, so a
  second refund of it changes nothing, however its reference is spelled;
- ``reverse``: gives back what one call was charged (its blocks ``blk:<ref>:<n>`` less the
  blocks refunded ``rfd:<ref>:<n>``); key ``reverse:<ref>``; refused while the call is live.

A negative one goes below a zero balance only with ``force``; one that crosses the
low-balance threshold notifies the policy worker like any debit (the ledger's outbox).
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass

from prepaid import keys
from prepaid.callrecord import hold_id, record_key
from prepaid.errors import InputError
from prepaid.inputs import check_reference, check_text
from prepaid.ledger import Change, Entry, Ledger, check_account_id, entry_from
from prepaid.redis_client import text

MAX_REASON = 200
_BATCH = 500  # accounts per pipelined look-up when the account is not given
_TOPUP_KEYS = ("topup:", "autotopup:", "ivrtopup:")  # policy/commands.py, worker.py, phone.py


@dataclass(frozen=True, slots=True)
class Correction:
    account: str
    kind: str
    amount: int  # the change of the balance, signed
    reference: str
    operator: str
    reason: str
    change: Change

    @property
    def duplicate(self) -> bool:
        return self.change.duplicate


def operator_name(given: str | None) -> str:
    """Who makes the correction: ``--operator``, else the Unix user running the command."""
    if given is not None:
        name = check_text(given, "--operator", limit=64)
        if not name.strip():
            raise InputError("--operator is empty; give a name or leave the option out")
        return name
    try:
        return getpass.getuser()
    except OSError:  # no login name and no passwd entry (a bare container)
        return f"uid {os.getuid()}"


def check_reason(reason: str) -> str:
    check_text(reason, "--reason", limit=MAX_REASON)
    if not reason.strip():
        raise InputError("--reason is empty; say why the balance is corrected")
    return reason


async def adjust(ledger: Ledger, account: str, amount: int, *, reason: str, reference: str,
                 operator: str, force: bool = False) -> Correction:
    """Add ``amount`` (negative: take it away) to the balance, once per ``reference``."""
    check_account_id(account)
    check_reason(reason)
    check_reference(reference)
    if amount == 0:
        raise InputError("amount is zero; give a positive or negative correction")
    await ledger.get(account)
    change = await ledger.correct("adjust", account, amount, key=f"adjust:{reference}",
                                  ref=reference, operator=operator, reason=reason, force=force)
    return Correction(account, "adjust", amount, reference, operator, reason, change)


def is_topup(entry: Entry, reference: str) -> bool:
    """The history entry is the credit of the top-up known by ``reference``: a manual one's
    reference, or an automatic or phone one's charge id (or the entry's whole reference)."""
    if entry.kind != "credit" or not entry.key.startswith(_TOPUP_KEYS):
        return False  # rfd:... credits give back call blocks: not top-ups
    return (entry.key == f"topup:{reference}" or entry.ref == reference
            or entry.ref.rsplit(" ", 1)[-1] == reference)


async def refund(ledger: Ledger, reference: str, *, account: str | None, reason: str,
                 operator: str, force: bool = False) -> Correction:
    """Take back the credit of the top-up ``reference``, once."""
    check_reference(reference, "REFERENCE")
    check_reason(reason)
    acct, entry = await _find_topup(ledger, reference, account)
    change = await ledger.correct("refund", acct, entry.amount, key=f"refund:{entry.key}",
                                  ref=reference, operator=operator, reason=reason, force=force)
    return Correction(acct, "refund", -entry.amount, reference, operator, reason, change)


async def reverse(ledger: Ledger, reference: str, *, account: str | None, reason: str,
                  operator: str) -> Correction:
    """Give back what the call ``reference`` (its uniqueid) was charged, once."""
    check_reference(reference, "REFERENCE")
    check_reason(reason)
    state = await ledger._call(ledger.redis.hmget(record_key(ledger.prefix, reference),
                                                  ["account", "state"]))
    acct = account or (text(state[0]) if state[0] is not None else None)
    if acct is None:
        acct = await _find_call_account(ledger, reference)
    check_account_id(acct)
    await ledger.get(acct)
    live = state[1] is not None and text(state[1]) in ("authorized", "answered")
    if live or hold_id(reference) in await ledger.holds(acct):
        raise InputError(f"call {reference} of account {acct!r} is live or not yet settled; "
                         "reverse it once it has ended")
    charged = await _call_charges(ledger, acct, reference)
    if charged <= 0:
        raise InputError(f"call {reference} charged nothing to account {acct!r}; "
                         "nothing to reverse")
    change = await ledger.correct("reverse", acct, charged, key=f"reverse:{reference}",
                                  ref=f"call {reference}", operator=operator, reason=reason)
    return Correction(acct, "reverse", charged, reference, operator, reason, change)


# -- finding what to undo ----------------------------------------------------------------
async def _each_account(ledger: Ledger, account: str | None) -> list[str]:
    if account is not None:
        check_account_id(account)
        await ledger.get(account)
        return [account]
    return await ledger.list_ids()


async def _find_topup(ledger: Ledger, reference: str, account: str | None) -> tuple[str, Entry]:
    ids = await _each_account(ledger, account)
    # A manual top-up's idempotency record names its history entry: one round trip per
    # batch of accounts.  Automatic and phone top-ups are found in the history.
    for start in range(0, len(ids), _BATCH):
        batch = ids[start:start + _BATCH]
        pipe = ledger.redis.pipeline(transaction=False)
        for a in batch:
            pipe.hget(ledger.keys(a)[3], f"topup:{reference}")
        for a, rec in zip(batch, await ledger._call(pipe.execute()), strict=True):
            if rec is not None:
                entry_id = text(rec).split("|")[4]
                rows = await ledger._call(ledger.redis.xrange(ledger.keys(a)[2], entry_id,
                                                              entry_id))
                if rows:
                    return a, entry_from(*rows[0])
    hits: list[tuple[str, Entry]] = []
    for a in ids:
        async for e in ledger.iter_history(a):
            if is_topup(e, reference):
                hits.append((a, e))
                break
    if not hits:
        where = f"account {account!r}" if account else "any account"
        raise InputError(f"no top-up with reference {reference!r} in {where}")
    if len(hits) > 1:
        raise InputError(f"top-ups with reference {reference!r} in accounts "
                         f"{', '.join(a for a, _ in hits)}; name one with --account")
    return hits[0]


async def _find_call_account(ledger: Ledger, reference: str) -> str:
    """The account whose call history logged the call (its record has expired)."""
    ids = await ledger.list_ids()
    for start in range(0, len(ids), _BATCH):
        batch = ids[start:start + _BATCH]
        pipe = ledger.redis.pipeline(transaction=False)
        for a in batch:
            pipe.zscore(keys.account_part(ledger.prefix, a, "calls:logged"), reference)
        for a, score in zip(batch, await ledger._call(pipe.execute()), strict=True):
            if score is not None:
                return a
    raise InputError(f"no call with reference {reference!r} in any account; "
                     "name its account with --account")


async def _call_charges(ledger: Ledger, account: str, reference: str) -> int:
    """What the call cost the account: its blocks less the blocks given back (metering's
    keys, ami_listener/meter.py), from the idempotency records, else from the history."""
    idem = ledger.keys(account)[3]
    total, n = 0, 0
    while True:
        names = [f"blk:{reference}:{n + i}" for i in range(1, 51)]
        got = await ledger._call(ledger.redis.hmget(idem, names))
        paid = [int(text(v).split("|")[1]) for v in got if v is not None]
        total += sum(paid)
        n += 50
        if len(paid) < 50:
            break
    if total:
        back = await ledger._call(ledger.redis.hmget(
            idem, [f"rfd:{reference}:{i}" for i in range(1, n + 1)]))
        return total - sum(int(text(v).split("|")[1]) for v in back if v is not None)
    charged = 0
    async for e in ledger.iter_history(account):
        if e.key.startswith((f"blk:{reference}:", f"rfd:{reference}:")):
            charged -= e.amount
    return charged

