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

import aiohttp  # noqa: E402

from exporter.catalogue import CATALOGUE  # noqa: E402
from exporter.catalogue.organizations import V3_CYCLES  # noqa: E402
from exporter.config import Config, parse_config  # noqa: E402
from exporter.plan import plan_of  # noqa: E402
from exporter.service import Exporter  # noqa: E402

KEY: Final = "cog_benchmark_0123456789"  # a v3 service user's token: the exporter speaks v3
V2_KEY: Final = "apk_user_benchmark"  # the simulator's v2 key (unused: v2 paths are not polled)
WINDOWS: Final = ("1h", "24h", "7d", "30d", "90d", "180d", "365d", "2h")
# Consumption's default windows (SPEC §10); the other per-window collectors take the top-level ones.
CONSUMPTION_WINDOWS: Final = ("today", "7d", "30d", "billing_cycle")
COLLECTOR_NAMES: Final = ("usage", "active_users", "consumption", "organizations", "queue")
PAGE_SIZE: Final = 200  # items per list page, as the exporter asks and the benchmark simulator gives
PROXY_VARS: Final = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")
SIMULATOR: Final = Path(__file__).with_name("_simulator.py")


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
    """Parse, after adding --smoke, --json and the hidden --child N (one size, measured in this process)."""
    parser.add_argument("--smoke", action="store_true", help="a tiny run (seconds): does the script work")
    parser.add_argument("--json", metavar="FILE", help="also write the raw figures of every size to FILE")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def sizes_and_latency(args: argparse.Namespace) -> tuple[list[int], float]:
    """The org set counts to run and the simulated latency: N = 2 and 10 ms for --smoke."""
    if args.smoke:
        return [2], 0.01
    return [int(n) for n in args.sizes.split(",")], args.latency


def write_json(args: argparse.Namespace, figures: object) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


class Simulator:
    """The simulator (benchmarks/_simulator.py) in its own process, so its CPU is not the exporter's;
    its enterprise has one organization per benchmark org set."""

    def __init__(self, latency: float, organizations: int = 6) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SIMULATOR), "--latency", str(latency), "--organizations", str(organizations),
             "--v3-token", KEY, "--api-key", V2_KEY],
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
        return process_cpu_seconds(self.proc.pid)

    async def requests(self) -> list[dict[str, object]]:
        """Every API request the simulator received so far, oldest first (its request log)."""
        async with aiohttp.ClientSession() as http, http.get(f"{self.url}/-/requests") as response:
            return await response.json()  # type: ignore[no-any-return]

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


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def config_text(base_url: str, sets: int, windows: int, *, concurrency: int = 32, rps: float = 1_000_000,
                interval: str = "1h", listen: str = "127.0.0.1:0", first: int = 0) -> str:
    """N org sets x W windows on API v3 with every collector on; no jitter and every interval long
    (queue's too), so each schedule polls once at start and the figures are of one cycle."""
    window_list = ", ".join(WINDOWS[:windows])
    org_sets = "".join(f"  - name: org-set-{i:04d}\n    org_ids: [org-{i}]\n" for i in range(first, first + sets))
    every = ", ".join(f"{name}: {{enabled: true, interval: {interval}}}" for name in COLLECTOR_NAMES)
    return f"""\
api:
  base_url: {base_url}
  api_key: {KEY}
  version: v3
  timeout: 30s
  retries: 0
  max_concurrency: {concurrency}
  max_requests_per_second: {rps}
poll:
  interval: {interval}
  jitter: 0
windows: [{window_list}]
collectors: {{{every}}}
org_sets:
{org_sets}server:
  listen: {listen}
"""


def bench_config(base_url: str, sets: int, windows: int, *, concurrency: int = 32,
                 rps: float = 1_000_000, interval: str = "1h") -> Config:
    text = config_text(base_url, sets, windows, concurrency=concurrency, rps=rps, interval=interval)
    return parse_config(text, "benchmark.yaml", env={})


def minimum_requests(sets: int, windows: int, organizations: int) -> dict[str, int]:
    """The fewest requests one cycle of `config_text`'s config can make, per collector, from the API's
    shape (not from the exporter's plan): usage is three calls per org set and window (sessions,
    PRs, searches), active users one, consumption one per organization of the set and consumption
    window, the organizations list one per page plus one for the billing cycles, the queue one."""
    return {"usage": 3 * sets * windows, "active_users": sets * windows,
            "consumption": sets * len(CONSUMPTION_WINDOWS),
            "organizations": max(1, math.ceil(organizations / PAGE_SIZE)) + 1, "queue": 1}


def _endpoint_patterns() -> list[tuple[re.Pattern[str], str]]:
    """Each v3 endpoint's path as a pattern, with the collector that asks it (from the catalogue)."""
    patterns = []
    for collector in CATALOGUE:
        for call in collector.calls.get("v3", ()):
            for endpoint in call:
                path = re.escape(endpoint.path).replace(re.escape("{id}"), "[^/]+")
                patterns.append((re.compile(f"^{path}$"), collector.name))
    patterns.append((re.compile(f"^{re.escape(V3_CYCLES.path)}$"), "organizations"))  # billing_cycle bounds
    return patterns


def requests_by_collector(log: Sequence[dict[str, object]]) -> tuple[dict[str, int], dict[str, int]]:
    """(requests, repeats) per collector in a request log. A repeat asks what an earlier request
    asked: the same path and parameters, time bounds compared as the span they cover (a window
    polled again one second later sends bounds one second later, asking the same thing again)."""
    patterns = _endpoint_patterns()
    counts = dict.fromkeys(COLLECTOR_NAMES, 0)
    repeats = dict.fromkeys(COLLECTOR_NAMES, 0)
    seen: set[tuple[object, ...]] = set()
    for record in log:
        path = str(record["path"])
        collector = next((name for pattern, name in patterns if pattern.match(path)), "other")
        query = dict(record["query"])  # type: ignore[call-overload]
        after, before = query.pop("time_after", None), query.pop("time_before", None)
        span = int(before[0]) - int(after[0]) if after and before else None
        key = (path, span, tuple(sorted((k, tuple(v)) for k, v in query.items())))
        counts[collector] = counts.get(collector, 0) + 1
        if key in seen:
            repeats[collector] = repeats.get(collector, 0) + 1
        seen.add(key)
    return counts, repeats


def first_cycle_done(exporter: Exporter, sets: int, windows: int) -> Callable[[], bool]:
    """Whether every schedule has finished its first poll."""
    least = sum(minimum_requests(sets, windows, organizations=sets).values())

    def done() -> bool:
        # The cheap counter first (+1 per attempt; a cycle makes at least the minimum): scanning
        # every schedule each millisecond would be most of the CPU measured at N = 1000.
        if exporter.stats.version < least:
            return False
        snap = exporter.snapshot
        return all(snap.result(k.org_set, *k.slot).last_attempt is not None for k in plan_of(snap.config).keys)

    return done


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
