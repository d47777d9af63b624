"""Every Redis key name the project uses, in one place (the scripts are in prepaid/lua.py).

Keys of one account share its hash tag ``{acct:ID}``, so a script that touches an account's
balance, holds, history and idempotency keys stays in one cluster slot. The rate decks
share ``{rates}``, the mail queue ``{mail}``.
"""

from __future__ import annotations

# The parts of an account's keys after its base key, in the order the ledger script takes.
ACCOUNT_PARTS = ("holds", "history", "idem", "outbox")


def account(prefix: str, account_id: str) -> str:
    """The account's hash (balance, held, settings)."""
    return f"{prefix}:{{acct:{account_id}}}"


def account_part(prefix: str, account_id: str, part: str) -> str:
    """One of the account's other keys: ``holds``, ``history``, ``pin-fails`` ..."""
    return f"{account(prefix, account_id)}:{part}"


def idempotency_bucket(prefix: str, account_id: str, day: int) -> str:
    """The account's idempotency keys first used in one bucket of time (a day; see
    prepaid/ledger.lua), which expires once no retry can come."""
    return account_part(prefix, account_id, f"idem:{day}")


def archive_mark(prefix: str, account_id: str) -> str:
    """How far the account's history and calls were archived (prepaid/archive.py)."""
    return account_part(prefix, account_id, "archived")


def archive_day(prefix: str, day: int) -> str:
    """Taken by the server that runs the day's archive (``[archive] daily``)."""
    return f"{prefix}:archive-day:{day}"


def account_pattern(prefix: str, part: str) -> tuple[str, str]:
    """(head, tail) of every account's ``part`` key, for SCAN: ``head*tail``."""
    return f"{prefix}:{{acct:", f"}}:{part}"


def outcomes(prefix: str, account_id: str) -> str:
    """The account's recent authorization outcomes (allowed and refused), capped."""
    return account_part(prefix, account_id, "outcomes")


def unknown_outcomes(prefix: str) -> str:
    """Refusals of calls whose account does not exist (one capped stream for all)."""
    return f"{prefix}:outcomes:unknown"


def account_calls(prefix: str, account_id: str) -> str:
    """The account's call history: a stream of settled calls, newest last."""
    return account_part(prefix, account_id, "calls")


def account_calls_logged(prefix: str, account_id: str) -> str:
    """References already in the call history (sorted set by time), so each is logged once."""
    return account_part(prefix, account_id, "calls:logged")


def accounts_index(prefix: str) -> str:
    """The set of every account id."""
    return f"{prefix}:accounts"


def outbox(prefix: str) -> str:
    """The shared stream the policy workers read (consumer group ``policy``)."""
    return f"{prefix}:outbox"


def call_record(prefix: str, ref: str) -> str:
    """A live call's record, by its reference (the channel's uniqueid)."""
    return f"{prefix}:callref:{ref}"


def call_record_pattern(prefix: str) -> str:
    return f"{prefix}:callref:*"


def meter(prefix: str, system_name: str) -> str:
    """A listener's heartbeat, per Asterisk server (``-`` when it has no system name)."""
    return f"{prefix}:meter:{system_name or '-'}"


def meter_head(prefix: str) -> str:
    return f"{prefix}:meter:"


def rates_base(prefix: str) -> str:
    return f"{prefix}:{{rates}}"


def mail_stream(prefix: str) -> str:
    return f"{prefix}:{{mail}}"


def mail_record(prefix: str, mail_id: str) -> str:
    return f"{prefix}:{{mail}}:{mail_id}"


def sandbox_charges(prefix: str, account_id: str) -> str:
    """The sandbox gateway's record of the charges it made, per account."""
    return account_part(prefix, account_id, "sandbox-charges")


def selfservice_requests(prefix: str) -> str:
    """The stream of phone top-up requests from the IVR menu (consumer group ``phone``)."""
    return f"{prefix}:selfservice"


def selfservice_result(prefix: str, account_id: str, request_key: str) -> str:
    """The short-lived outcome of one phone top-up request, which the menu polls."""
    return account_part(prefix, account_id, f"selfservice:{request_key}")


def dead_letters(prefix: str) -> str:
    """The dead-letter stream: events of any consumer-group stream whose handling kept
    failing (prepaid/deadletters.py)."""
    return f"{prefix}:{{deadletters}}"


def dead_letter_attempts(prefix: str, stream: str, entry_id: str) -> str:
    """How often the handling of one stream entry failed so far (expires after a week)."""
    return f"{prefix}:{{deadletters}}:attempts:{stream}:{entry_id}"


def web_admin(prefix: str) -> str:
    """The scrypt hash of the web page's admin password."""
    return f"{prefix}:web-admin"


def web_admin_fails(prefix: str) -> str:
    """Wrong admin passwords of the last 15 minutes (the lock-out's counter)."""
    return f"{prefix}:web-admin:fails"


def support_requests(prefix: str) -> str:
    """The stream of support requests from the web page (larger top-ups), for the admin."""
    return f"{prefix}:support"


def support_credited(prefix: str) -> str:
    """Support requests seen credited: request id -> when (the ledger forgets its
    idempotency keys after [ledger] idempotency_days; this does not)."""
    return f"{prefix}:support:credited"


def sandbox_checkout(prefix: str, session_id: str) -> str:
    """One Checkout session of the sandbox gateway's hosted page (mode, account, amount)."""
    return f"{prefix}:sandbox-checkout:{session_id}"


def sandbox_checkouts(prefix: str) -> str:
    """The sandbox's Checkout session ids by creation time, for the reconciliation pass."""
    return f"{prefix}:sandbox-checkouts"
