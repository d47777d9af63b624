"""The goal table of ``python -m bench``: a goal is met, missed or not measured."""

from __future__ import annotations

from bench import goals


def by_name(rows: list[goals.Row]) -> dict[str, goals.Row]:
    return {r.goal: r for r in rows}


def test_a_benchmark_not_run_is_not_measured_never_met() -> None:
    rows = goals.check({"ledger": {"ratio": 0.3}, "ami": {"skipped": "no pbx"}})
    assert [r.met for r in rows if r.goal.startswith("ledger")] == [True]
    assert all(r.met is None and r.figure is None for r in rows if not r.goal.startswith("ledger"))


def test_cpu_and_setup_goals_read_the_real_sip_steps() -> None:
    steps = [{"rate": 50, "dialed": 300, "auth_p99_ms": 4.0,
              "cpu": {"asterisk": 0.8, "agi": 0.1, "ami": 0.3, "policy": 0.0, "redis": 0.1}},
             {"rate": 100, "dialed": 600, "auth_p99_ms": 9.0, "cpu": {"asterisk": 1.0}},
             {"rate": 90, "dialed": 0, "auth_p99_ms": 1.0, "cpu": {}}]
    rows = by_name(goals.check({"sip_ramp": {"steps": steps}}))
    cpu = rows["serve CPU / Asterisk CPU, real SIP calls"]
    assert cpu.figure == 0.5 and cpu.met is False  # (0.1 + 0.3) / 0.8, Redis not counted
    setup = rows["authorization added to set-up, p99, 100 calls/s"]
    assert setup.figure == 9.0 and setup.met is False  # the 100/s step
    assert goals.as_json([setup])[0]["figure_over_target"] == 1.8
