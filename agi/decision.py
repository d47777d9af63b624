"""Pure authorization decisions: which account, allowed or not, for how long, what to play.

No I/O here: the routes gather the account, rate and available credit, and turn the
:class:`Decision` into AGI commands and channel variables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from prepaid.rating import Rate, affordable_blocks, block_cost, max_call_seconds

PROMPT_NO_CREDIT = "prepaid/balance-too-low"
PROMPT_REFUSED = "prepaid/call-cannot-be-completed"
PROMPT_LOW_BALANCE = "prepaid/low-balance-warning"


class Status(StrEnum):
    ALLOWED = "ALLOWED"
    DENIED = "DENIED"
    ERROR = "ERROR"


class Reason(StrEnum):
    NONE = ""
    NO_CREDIT = "NO_CREDIT"
    UNKNOWN_ACCOUNT = "UNKNOWN_ACCOUNT"
    SUSPENDED = "SUSPENDED"
    NO_RATE = "NO_RATE"
    INTERNAL = "INTERNAL"
    FAIL_OPEN = "FAIL_OPEN"
    IN_CALL = "IN_CALL"  # the channel is already a metered prepaid call (e.g. transferred)
    NO_METERING = "NO_METERING"  # this server's metering is away or behind: it would go unbilled
    BUSY = "BUSY"  # authorizations take longer than [agi] busy_seconds: refused at once
    DUPLICATE_CALL = "DUPLICATE_CALL"  # another account's live call has this uniqueid
    CURRENCY = "CURRENCY"  # the account's currency is not its plan's deck's: never converted


@dataclass(frozen=True, slots=True)
class Policy:
    """The settings a decision depends on (from [billing] and [agi])."""

    max_call_seconds: int = 3 * 3600
    warning_ms: int = 60_000
    hangup_on_deny: bool = True
    fail_open: bool = False
    ring_seconds: int = 60


@dataclass(frozen=True, slots=True)
class Decision:
    status: Status
    reason: Reason
    max_seconds: int = 0
    dial_limit: str = ""  # "<max ms>:<warning ms>" for Dial's L() option (a hard limit)
    warning_limit: str = ""  # the shipped dialplan's L(): see warning_limit()
    hold: int = 0  # micro-units to reserve: connect fee + first block
    prompt: str = ""  # played (after ANSWER) before HANGUP when denied, if hanging up
    hangup: bool = False
    low_balance: bool = False
    ring_seconds: int = 0

    @property
    def allowed(self) -> bool:
        return self.status is Status.ALLOWED

    @property
    def timeout(self) -> int:
        """TIMEOUT(absolute) for the caller before Dial: ringing plus the paid time.

        The metering listener resets it at answer and after every paid block, so a
        top-up during the call extends it (Dial's L() limit could not be extended)."""
        return self.max_seconds + self.ring_seconds if self.allowed else 0


def dial_limit(max_seconds: int, warning_ms: int) -> str:
    """Dial L(x:y): a warning at or past the limit would never play, so it becomes 0 (none)."""
    limit_ms = max_seconds * 1000
    warning = warning_ms if 0 < warning_ms < limit_ms else 0
    return f"{limit_ms}:{warning}"


def warning_limit(max_seconds: int, cap_seconds: int, warning_ms: int) -> str:
    """Dial L(x:y) of the shipped dialplan, which has Asterisk play the credit warning itself
    (no AMI Originate, so the metering user needs no ``originate`` right): x is the [billing]
    max_call_seconds cap, since the call's end is TIMEOUT(absolute), which metering extends
    after a top-up; y puts the warning ``warning_ms`` before the paid ``max_seconds`` end, or
    1 ms after answer when less is paid; y is 0 (no warning) with warnings off."""
    cap_ms = max(cap_seconds, max_seconds) * 1000
    if warning_ms <= 0:
        return f"{cap_ms}:0"
    at = max(1, max_seconds * 1000 - warning_ms)
    return f"{cap_ms}:{cap_ms - at}"


def deny(reason: Reason, policy: Policy) -> Decision:
    # The caller's account is fine: the system cannot take (or bill) the call right now.
    status = (Status.ERROR if reason in (Reason.INTERNAL, Reason.NO_METERING, Reason.BUSY,
                                         Reason.DUPLICATE_CALL)
              else Status.DENIED)
    prompt = PROMPT_NO_CREDIT if reason is Reason.NO_CREDIT else PROMPT_REFUSED
    # BUSY: no more AGI commands to a PBX that is short of time; the dialplan plays the prompt.
    return Decision(status, reason, prompt=prompt,
                    hangup=policy.hangup_on_deny and reason is not Reason.BUSY)


def on_failure(policy: Policy) -> Decision:
    """Redis or the rate deck cannot be reached: fail closed, or open if configured."""
    if policy.fail_open:
        seconds = policy.max_call_seconds
        return Decision(Status.ALLOWED, Reason.FAIL_OPEN, seconds,
                        dial_limit(seconds, policy.warning_ms),
                        warning_limit(seconds, policy.max_call_seconds, policy.warning_ms),
                        ring_seconds=policy.ring_seconds)
    return deny(Reason.INTERNAL, policy)


def decide(*, status: str, balance: int, threshold: int, rate: Rate, available: int,
           policy: Policy) -> Decision:
    """Allow a call when the credit not held by other calls pays at least the first block."""
    if status != "active":
        return deny(Reason.SUSPENDED, policy)
    if affordable_blocks(rate, available, policy.max_call_seconds) == 0:
        return deny(Reason.NO_CREDIT, policy)
    seconds = max_call_seconds(rate, available, policy.max_call_seconds)
    return Decision(Status.ALLOWED, Reason.NONE, seconds, dial_limit(seconds, policy.warning_ms),
                    warning_limit(seconds, policy.max_call_seconds, policy.warning_ms),
                    hold=block_cost(rate, 1), low_balance=0 < threshold and balance < threshold,
                    ring_seconds=policy.ring_seconds)


def pick_account(sources: tuple[str, ...], env: Mapping[str, str],
                 variable: str | None) -> str:
    """The first non-empty source in the configured order ('' if none)."""
    for source in sources:
        if source == "variable":
            value = variable or ""
        elif source == "accountcode":
            value = env.get("agi_accountcode", "")
        else:
            value = env.get("agi_callerid", "")
            if value.lower() in ("unknown", "anonymous"):
                value = ""
        if value.strip():
            return value.strip()
    return ""


def dialed_number(args: Sequence[str], env: Mapping[str, str]) -> str:
    """The number to rate: the route's first argument if given (for FastAGI the one after
    the secret), else the extension."""
    return ((args[0] if args else "") or env.get("agi_extension") or "").strip()
