"""Shared by the benchmarks: the simulator in its own process, configs of N org sets, tables, readings."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py`: import this checkout, not an installed copy
    sys.path.insert(0, str(ROOT))

from exporter.config import Config, parse_config  # noqa: E402

KEY: Final = "apk_user_benchmark"
WINDOWS: Final = ("1h", "24h", "7d", "30d", "90d", "180d", "365d", "2h")
PROXY_VARS: Final = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")


def child_env() -> dict[str, str]:
    """This environment for a child process: importing this checkout, without proxies (loopback only)."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every size-sweeping benchmark takes; the script adds its own, then `bench_args`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,1000", help="org set counts N, comma-separated")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--latency", type=float, default=0.05, help="simulated upstream latency, seconds")
    return parser


def bench_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, after adding --smoke and the hidden --child N (one size, measured in this process)."""
    parser.add_argument("--smoke", action="store_true", help="a tiny run (seconds): does the script work")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def sizes_and_latency(args: argparse.Namespace) -> tuple[list[int], float]:
    """The org set counts to run and the simulated latency: N = 2 and 10 ms for --smoke."""
    if args.smoke:
        return [2], 0.01
    return [int(n) for n in args.sizes.split(",")], args.latency


class Simulator:
    """`devin-usage-exporter simulate` in its own process, so its CPU is not the exporter's."""

    def __init__(self, latency: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", "simulate", "--listen", "127.0.0.1:0",
             "--latency", str(latency), "--api-key", KEY],
            cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "simulator listening on http://127.0.0.1:PORT"
        match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        if match is None:
            self.proc.kill()
            errors = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"simulator did not start: {line!r} {errors}")
        self.url = match.group(1)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def bench_config(base_url: str, sets: int, windows: int, *, concurrency: int = 32,
                 rps: float = 1_000_000, interval: str = "1h") -> Config:
    """N org sets x W windows; no jitter and a long interval, so each schedule polls once at start."""
    window_list = ", ".join(WINDOWS[:windows])
    org_sets = "".join(f"  - name: org-set-{i:04d}\n    org_ids: [org-{i}]\n" for i in range(sets))
    text = f"""\
api:
  base_url: {base_url}
  api_key: {KEY}
  timeout: 30s
  retries: 0
  max_concurrency: {concurrency}
  max_requests_per_second: {rps}
poll:
  interval: {interval}
  jitter: 0
windows: [{window_list}]
# Release 0.1's workload (v2 usage); issue 15 measures v3 with every collector.
collectors: {{organizations: {{enabled: false}}, consumption: {{enabled: false}}}}
org_sets:
{org_sets}server:
  listen: 127.0.0.1:0
"""
    return parse_config(text, "benchmark.yaml", env={})


async def wait_first_cycle(done: Callable[[], bool], within: float) -> None:
    """Poll (every ms) until `done()` is true; the benchmark's own granularity is 1 ms."""
    deadline = time.monotonic() + within
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"first poll cycle did not finish within {within}s")
        await asyncio.sleep(0.001)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    return time.process_time()


def run_child(script: Path, args: Sequence[str], timeout: float = 900) -> dict[str, object]:
    """Run `script --child ...` in a fresh interpreter (fresh RSS) and return its JSON result line."""
    done = subprocess.run([sys.executable, str(script), "--child", *args], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    python = sys.version.split()[0]
    return f"{os.cpu_count()} CPUs ({model}), Python {python}, load avg {os.getloadavg()[0]:.2f}"
