"""``python -m bench [NAME ...]``: run the benchmarks, print a table, write bench/results/."""

from __future__ import annotations

import importlib
import platform
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.common import save

# Each module has run() -> dict of figures; missing modules are skipped with a note.
BENCHMARKS = ["ledger", "agi", "ami", "ami_client", "policy", "e2e", "scale", "sip_ramp"]


def main(argv: list[str]) -> int:
    names = argv or BENCHMARKS
    console = Console()
    results: dict[str, Any] = {"machine": f"{platform.machine()} {platform.processor()}".strip(),
                               "python": platform.python_version(),
                               "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    table = Table("benchmark", "figure", "value")
    failed = False
    for name in names:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError:
            table.add_row(name, "-", "not written yet")
            continue
        console.print(f"running {name} ...")
        try:
            figures = module.run()
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
    # A subset run keeps its own file, so it never hides the figures of a full run.
    path = save("latest" if not argv else "-".join(names), results)
    console.print(f"written to {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
