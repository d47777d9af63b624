"""``python -m bench [NAME ...]``: run the benchmarks, print a table, write bench/results/."""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import (
    agi,
    ami,
    ami_client,
    audit,
    deck,
    e2e,
    goals,
    ledger,
    policy,
    retention,
    scale,
    sip_ramp,
)
from bench.common import save

# Each run() returns a dict of figures.
BENCHMARKS: dict[str, Callable[[], dict[str, Any]]] = {
    "ledger": ledger.run, "agi": agi.run, "ami": ami.run, "ami_client": ami_client.run,
    "policy": policy.run, "e2e": e2e.run, "scale": scale.run, "sip_ramp": sip_ramp.run,
    "deck": deck.run, "audit": audit.run,
    "retention": retention.run}


def goal_table(rows: list[goals.Row]) -> Table:
    table = Table("goal", "figure", "target", "figure / target", "met", title="goals")
    for row in rows:
        bound = "<=" if goals.GOALS[rows.index(row)].at_most else ">="
        figure = "not measured" if row.figure is None else f"{row.figure:g} {row.unit}"
        ratio = "-" if row.figure is None else f"{row.figure / row.target:.2f}"
        met = "-" if row.met is None else ("yes" if row.met else "NO")
        table.add_row(row.goal, figure, f"{bound} {row.target:g} {row.unit}", ratio, met)
    return table


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    console = Console()
    results: dict[str, Any] = {"machine": f"{platform.machine()} {platform.processor()}".strip(),
                               "python": platform.python_version(),
                               "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    table = Table("benchmark", "figure", "value")
    failed = False
    for name in names:
        bench = BENCHMARKS.get(name)
        if bench is None:
            table.add_row(name, "-", f"no such benchmark (one of {', '.join(BENCHMARKS)})")
            continue
        console.print(f"running {name} ...")
        try:
            figures = bench()
        except Exception as exc:  # report and go on with the others
            failed = True
            table.add_row(name, "error", str(exc))
            continue
        if figures.get("skipped"):
            table.add_row(name, "skipped", str(figures["skipped"]))
            continue
        results[name] = figures
        for key, value in figures.items():
            table.add_row(name, key, str(value))
    console.print(table)
    rows = goals.check(results)
    results["goals"] = goals.as_json(rows)
    console.print(goal_table(rows))
    # A subset run keeps its own file, so it never hides the figures of a full run.
    path = save("latest" if not argv else "-".join(names), results)
    console.print(f"written to {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
