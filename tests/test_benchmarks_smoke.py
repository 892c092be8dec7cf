"""Each benchmark, run tiny (N = 2, a few requests), so the scripts cannot rot unnoticed.

No speed is asserted here (the machine is shared); only that each script runs end to end
against the simulator over loopback and prints its table with a row per size.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str) -> list[list[str]]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"# {script.removesuffix('.py')}:"), lines[0]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("|")]


def _rows(table: list[list[str]]) -> list[dict[str, str]]:
    """Rows of every table printed, as header -> cell (a table's header row starts with `N sets`)."""
    rows: list[dict[str, str]] = []
    header: list[str] = []
    for cells in table:
        if cells[0] == "N sets":
            header = cells
        elif not cells[0].startswith("-"):
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


def test_poll_cycle_benchmark_runs_and_every_collector_makes_its_minimum_of_requests() -> None:
    cycle, *collectors = _rows(_run("poll_cycle.py"))
    # N = 2 on v3, every collector: 2 x 4 x (3 usage + 1 active users + 1 consumption) + 2 pages and
    # cycles of organizations + 1 queue.
    assert cycle["N sets"] == "2" and cycle["R (minimum)"] == "43" and cycle["failed"] == "0"
    assert float(cycle["ratio"]) >= 1.0  # nothing beats the lower bound
    assert [row["collector"] for row in collectors] == ["usage", "active_users", "consumption", "organizations",
                                                        "queue"]
    for row in collectors:
        assert row["requests made"] == row["minimum requests"] and row["repeated"] == "0", row


def test_scrape_benchmark_runs_every_variant_and_the_polling_comparison() -> None:
    rows = _rows(_run("scrape.py"))
    variants = [row["variant"] for row in rows]
    assert variants == ["text", "text+gzip", "openmetrics", "openmetrics+gzip", "text, no keep-alive",
                        "text", "openmetrics+gzip"]
    assert all(float(row["p50 ratio"]) > 0 for row in rows)
    assert int(rows[-1]["cycles"]) >= 1


def test_footprint_benchmark_runs() -> None:
    (row,) = _rows(_run("footprint.py"))
    assert row["N sets"] == "2"
    assert float(row["RSS after scrapes MB"]) > 10
    assert float(row["idle CPU s/min"]) >= 0


def test_reload_benchmark_sees_the_reload_while_scraping() -> None:
    (row,) = _rows(_run("reload.py"))
    assert row["N sets"] == "2" and int(row["scrapes while reloading"]) > 0
    assert float(row["reload shown after s"]) > 0 and float(row["max scrape delay ms"]) > 0
