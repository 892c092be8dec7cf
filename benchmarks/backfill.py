"""`devin-usage-exporter backfill` of D days x N org sets against the simulator: requests, wall time, peak RSS.

The simulator runs in its own process (`--latency L`); the backfill runs as the real command line in
another, and its peak RSS comes from the kernel's rusage of that child (os.wait4). The config is
v3 with every collector at its defaults (usage, active_users, consumption backfilled; the default
windows of at most 7 days) and api.max_concurrency at its default of 4. The rate limit is lifted
(`--rps`) so the run measures the exporter and the simulated latency, and the table adds what the
same requests take at the default limit of 2 per second. Several D show whether memory grows with
the length of the history (it should not: the output is spooled to disk).

    python benchmarks/backfill.py                   # D = 7, 30; N = 10; L = 50 ms
    python benchmarks/backfill.py --days 90 --sets 10 --rps 2   # the real thing, ~1h45m
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from _common import ROOT, child_env, machine, table

from exporter.progress import duration

TOKEN = "cog_benchmark_backfill"
DEFAULT_RPS = 2.0  # api.max_requests_per_second's default


def config(base_url: str, sets: int, rps: float) -> str:
    # One enterprise-wide set and N-1 sets of one organization each, as discovery would make them.
    org_ids = ["org-platform-1", "org-platform-2", "org-mobile", "org-123", "org-456", "org-789"]
    org_sets = "  - name: enterprise\n" + "".join(
        f"  - name: set-{i:02d}\n    org_ids: [{org_ids[i % len(org_ids)]}]\n    labels: {{team: t{i}}}\n"
        for i in range(1, sets))
    return f"""\
api:
  base_url: {base_url}
  api_key: {TOKEN}
  max_requests_per_second: {rps}
org_sets:
{org_sets}"""


def measure(url: str, days: int, sets: int, rps: float, tmp: Path) -> dict[str, object]:
    path = tmp / f"backfill-{days}d.yaml"
    path.write_text(config(url, sets, rps))
    output = tmp / f"history-{days}d.om"
    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = end - timedelta(days=days)
    argv = [sys.executable, "-m", "exporter", "backfill", "--config", str(path), "--start", start.date().isoformat(),
            "--end", end.date().isoformat(), "--output", str(output)]
    started = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    assert child.stderr is not None
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    summary = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    match = re.search(r"wrote (\d+) sample\(s\) of (\d+) point\(s\).*\((\d+) request\(s\)\)", summary)
    if child.returncode != 0 or match is None:
        raise RuntimeError(f"backfill exited {child.returncode}:\n{stderr}")
    samples, points, requests = (int(g) for g in match.groups())
    return {"days": days, "sets": sets, "points": points, "samples": samples, "requests": requests,
            "wall_s": wall, "req_per_s": requests / wall, "peak_rss_mb": usage.ru_maxrss / 1024,
            "output_mb": output.stat().st_size / 2**20, "at_2_per_s": duration(requests / DEFAULT_RPS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", default="7,30", help="history lengths D, comma-separated")
    parser.add_argument("--sets", type=int, default=10, help="org sets N")
    parser.add_argument("--latency", type=float, default=0.05, help="simulated upstream latency, seconds")
    parser.add_argument("--rps", type=float, default=1_000_000, help="api.max_requests_per_second of the run")
    parser.add_argument("--smoke", action="store_true", help="a tiny run (seconds): does the script work")
    args = parser.parse_args()
    days = [1] if args.smoke else [int(d) for d in args.days.split(",")]
    sets = 2 if args.smoke else args.sets
    latency = 0.01 if args.smoke else args.latency
    simulator = subprocess.Popen([sys.executable, "-m", "exporter", "simulate", "--listen", "127.0.0.1:0",
                                  "--latency", str(latency), "--v3-token", TOKEN],
                                 cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True)
    try:
        assert simulator.stdout is not None
        match = re.search(r"(http://127\.0\.0\.1:\d+)", simulator.stdout.readline())
        if match is None:
            raise RuntimeError("the simulator did not start")
        with tempfile.TemporaryDirectory(prefix="backfill-bench-") as tmp:
            rows = [measure(match.group(1), d, sets, args.rps, Path(tmp)) for d in days]
    finally:
        simulator.terminate()
        simulator.wait(10)
    print(f"# backfill: N={sets}, L={latency * 1000:g} ms, max_concurrency 4, max_requests_per_second {args.rps:g}; "
          f"{machine()}")
    headers = list(rows[0])
    print(table(headers, [[row[h] for h in headers] for row in rows]))


if __name__ == "__main__":
    main()
