"""Pure rating: billed duration, call cost and the longest affordable call for one rate.

Billing runs in blocks: the first block is the initial increment (stretched to the
minimum charged duration), every later block is one following increment.  A call
of ``d`` seconds is billed up to the end of the block it ends in.  Metering pays
block by block; :func:`block_cost` is the difference of two cumulative costs, so
the blocks paid always add up to :func:`cost` of the billed duration exactly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from prepaid.money import div_round_up


@dataclass(frozen=True, slots=True)
class Rate:
    prefix: str
    name: str
    per_minute: int  # micro-units
    connect_fee: int  # micro-units, charged once at answer
    initial: int  # seconds in the first block
    increment: int  # seconds in each following block
    minimum: int = 0  # minimum charged duration in seconds

    @property
    def first_block(self) -> int:
        """Seconds covered by the first block: the initial increment, or the
        minimum duration rounded up to whole following increments."""
        if self.minimum <= self.initial:
            return self.initial
        extra = self.minimum - self.initial
        return self.initial + -(-extra // self.increment) * self.increment


def rate_json(rate: Rate) -> str:
    """The rate as the call record and the call history keep it."""
    return json.dumps(dataclasses.asdict(rate))


def rate_from_json(raw: str) -> Rate:
    """The inverse of :func:`rate_json`; ValueError (or TypeError) if it is not one."""
    return Rate(**json.loads(raw))


def billed_seconds(rate: Rate, duration: int) -> int:
    """Seconds charged for a call that was up for ``duration`` seconds (0 if never up)."""
    if duration <= 0:
        return 0
    first = rate.first_block
    if duration <= first:
        return first
    return first + -(-(duration - first) // rate.increment) * rate.increment


def cost_of_billed(rate: Rate, billed: int) -> int:
    if billed <= 0:
        return 0
    return rate.connect_fee + div_round_up(rate.per_minute * billed, 60)


def cost(rate: Rate, duration: int) -> int:
    """Micro-units charged for a call up for ``duration`` seconds."""
    return cost_of_billed(rate, billed_seconds(rate, duration))


def covered_seconds(rate: Rate, blocks: int) -> int:
    """Seconds paid for once ``blocks`` blocks have been paid."""
    if blocks <= 0:
        return 0
    return rate.first_block + (blocks - 1) * rate.increment


def block_cost(rate: Rate, block: int) -> int:
    """Price of block number ``block`` (1 = connect fee plus first block)."""
    if block <= 0:
        return 0
    return cost_of_billed(rate, covered_seconds(rate, block)) - cost_of_billed(
        rate, covered_seconds(rate, block - 1)
    )


def blocks_for(rate: Rate, duration: int) -> int:
    """How many blocks a call of ``duration`` seconds uses."""
    if duration <= 0:
        return 0
    first = rate.first_block
    if duration <= first:
        return 1
    return 1 + -(-(duration - first) // rate.increment)


def affordable_blocks(rate: Rate, available: int, max_seconds: int) -> int:
    """Most blocks whose total cost fits in ``available``, not going past ``max_seconds``."""
    if available < 0 or max_seconds <= 0:
        return 0
    hi = blocks_for(rate, max_seconds)
    if cost_of_billed(rate, covered_seconds(rate, hi)) <= available:
        return hi
    lo = 0  # invariant: lo affordable, hi not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost_of_billed(rate, covered_seconds(rate, mid)) <= available:
            lo = mid
        else:
            hi = mid
    return lo


def max_call_seconds(rate: Rate, available: int, max_seconds: int) -> int:
    """Longest call the available credit pays for, capped at ``max_seconds``."""
    return min(covered_seconds(rate, affordable_blocks(rate, available, max_seconds)), max_seconds)
