"""The performance goals (issue 12), each read off figures measured in the same run.

A goal is a figure, a target and which way is better; :func:`check` turns one run's
results into rows that ``python -m bench`` prints and writes under ``goals``. A goal whose
benchmark was not run (or was skipped) is reported as not measured, never as met.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

Results = Mapping[str, Any]


@dataclass(frozen=True)
class Goal:
    name: str
    target: float
    at_most: bool  # True: the figure must stay at or below the target
    unit: str
    figure: Callable[[Results], float | None]
    how: str


@dataclass(frozen=True)
class Row:
    goal: str
    figure: float | None
    target: float
    unit: str
    met: bool | None  # None: not measured in this run
    how: str


def _get(results: Results, bench: str, key: str) -> float | None:
    figures = results.get(bench)
    if not isinstance(figures, Mapping):
        return None
    value = figures.get(key)
    return float(value) if isinstance(value, int | float) else None


def _sip_step(results: Results, rate: float) -> Mapping[str, Any] | None:
    figures = results.get("sip_ramp")
    if not isinstance(figures, Mapping):
        return None
    steps = [s for s in figures.get("steps", []) if isinstance(s, Mapping)]
    # The step at the rate asked for, else the highest one below it that ran.
    below = [s for s in steps if float(s.get("rate", 0)) <= rate and s.get("dialed")]
    return max(below, key=lambda s: float(s["rate"])) if below else None


def _cpu_ratio(results: Results) -> float | None:
    """serve's CPU over Asterisk's for the same real SIP calls (the ramp's 50 calls/s step,
    or the highest below it); else the Local-channel end-to-end figure."""
    step = _sip_step(results, 50)
    if step is not None:
        cpu = step.get("cpu", {})
        serve = sum(v for k, v in cpu.items() if k not in ("asterisk", "redis"))
        asterisk = cpu.get("asterisk", 0.0)
        return round(serve / asterisk, 3) if asterisk else None
    pct = _get(results, "e2e", "serve_cpu_pct_of_asterisk")
    return None if pct is None else round(pct / 100, 3)


def _auth_added_p99(results: Results) -> float | None:
    """The AGI step's own p99 in Asterisk's log at 100 calls/s: what authorization adds
    to call set-up (the same dialplan without it has no such step)."""
    step = _sip_step(results, 100)
    return None if step is None else float(step.get("auth_p99_ms", 0.0))


GOALS: tuple[Goal, ...] = (
    Goal("serve CPU / Asterisk CPU, real SIP calls", 0.25, True, "ratio", _cpu_ratio,
         "sip_ramp: CPU of serve's processes over Asterisk's, from /proc, 50 calls/s step"),
    Goal("authorization added to set-up, p99, 100 calls/s", 5.0, True, "ms", _auth_added_p99,
         "sip_ramp: the AGI() step in Asterisk's log (highest step at or below 100/s)"),
    Goal("FastAGI p99 at 200 authorizations/s offered", 5.0, True, "ms",
         lambda r: _get(r, "agi", "fastagi_offered_p99_ms"), "agi: open loop, 5 s"),
    Goal("FastAGI authorizations/s at saturation, one core", 2000.0, False, "/s",
         lambda r: _get(r, "agi", "fastagi_apart_per_server_core_s"),
         "agi: 50 concurrent peers in their own process; calls per CPU second of the server"),
    Goal("AMI events/s, parse and track, one core", 50_000.0, False, "/s",
         lambda r: _get(r, "ami", "parse_track_events_per_second"),
         "ami: recorded Asterisk 22 traffic, the live parser and the tracker"),
    Goal("ledger ops / plain EVALSHA", 0.25, False, "ratio",
         lambda r: _get(r, "ledger", "ratio"), "ledger: both measured in this run"),
)


def check(results: Results) -> list[Row]:
    rows = []
    for goal in GOALS:
        value = goal.figure(results)
        met = None if value is None else (value <= goal.target if goal.at_most
                                          else value >= goal.target)
        rows.append(Row(goal.name, value, goal.target, goal.unit, met, goal.how))
    return rows


def as_json(rows: list[Row]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        item = asdict(row)
        if row.figure is not None and row.target:
            item["figure_over_target"] = round(row.figure / row.target, 3)
        out.append(item)
    return out
