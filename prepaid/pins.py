"""Self-service PINs, shared by the IVR menu and the "My account" web page.

A PIN is 4 to 8 ASCII digits, as voicemail's.  Only its scrypt hash is stored, in the
account's hash (field ``pin``); no command prints it.  Every attempt is counted before the
PIN is checked, across the phone and the web alike: after ``MAX_FAILURES`` wrong PINs in
``LOCK_SECONDS`` the account's self-service is locked until that window ends.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import secrets

from prepaid import batching, keys, lua
from prepaid.errors import InputError
from prepaid.ledger import Ledger, check_account_id
from prepaid.redis_client import RedisClient

MAX_FAILURES = 5
LOCK_SECONDS = 900
_N, _R, _P = 2**14, 8, 1  # scrypt: about 30 ms a check, off the event loop


class PinCheck(enum.Enum):
    OK = "ok"
    WRONG = "wrong"
    LOCKED = "locked"
    NO_PIN = "no-pin"


def check_pin(pin: str, what: str = "PIN") -> str:
    """The PIN if it is 4-8 ASCII digits (``str.isdigit`` alone would take ``١٢٣٤``)."""
    if not (4 <= len(pin) <= 8 and pin.isascii() and pin.isdigit()):
        raise InputError(f"{what} must be 4 to 8 digits 0-9")
    return pin


def hash_pin(pin: str, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(pin.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return f"scrypt${salt.hex()}${digest.hex()}"


def pin_matches(pin: str, stored: str) -> bool:
    try:
        scheme, salt, digest = stored.split("$")
        raw = bytes.fromhex(salt)
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    return hmac.compare_digest(hash_pin(pin, raw).rsplit("$", 1)[1], digest)


def _fails_key(ledger: Ledger, account: str) -> str:
    return keys.account_part(ledger.prefix, account, "pin-fails")


async def set_pin(ledger: Ledger, account: str, pin: str | None) -> None:
    """Set (or, with ``None``, clear) the account's PIN; clears a lock-out too."""
    check_account_id(account)
    stored = "" if pin is None else await asyncio.to_thread(hash_pin, check_pin(pin))
    await ledger.update(account, pin=stored)
    await ledger.redis.delete(_fails_key(ledger, account))


async def has_pin(ledger: Ledger, account: str) -> bool:
    value = await ledger.redis.hget(ledger.account_key(account), "pin")
    return bool(value)


async def attempt_allowed(redis: RedisClient, fails_key: str) -> bool:
    """Count one attempt at ``fails_key`` first (one script), then say whether it may be
    checked: False once MAX_FAILURES came within LOCK_SECONDS (the phone menu, the web
    page and the admin log-in share these limits)."""
    attempt = batching.of(redis).script_for(lua.PIN_ATTEMPT)
    n = int(await attempt(keys=[fails_key], args=[MAX_FAILURES, LOCK_SECONDS]))
    return n > 0


async def verify_pin(ledger: Ledger, account: str, pin: str) -> PinCheck:
    """Check ``pin`` for ``account``, counting the attempt.  Unknown accounts and accounts
    without a PIN are counted alike, so a guesser learns nothing of which exist."""
    check_account_id(account)
    if not await attempt_allowed(ledger.redis, _fails_key(ledger, account)):
        return PinCheck.LOCKED
    stored = await ledger.redis.hget(ledger.account_key(account), "pin")
    if not stored:
        return PinCheck.NO_PIN
    text = stored.decode() if isinstance(stored, bytes) else str(stored)
    if not await asyncio.to_thread(pin_matches, pin, text):
        return PinCheck.WRONG
    await ledger.redis.delete(_fails_key(ledger, account))
    return PinCheck.OK

