"""Soak: the exporter polling a faulty simulator at a 1 s interval while /metrics is scraped non-stop.

The exporter runs in this process (so its tasks can be counted); the simulator runs in a child
process with a seeded error rate, and a fault driver switches latency, 429 storms with Retry-After,
malformed bodies and timeouts on and off at random. A scraper fetches /metrics back to back.

Figures (RSS, open file descriptors, asyncio tasks other than polls in flight) are printed at
start, after the warm-up and at the end, with the poll attempts made and the scrapes answered.
Exit status 1 if, after the warm-up, RSS grew by more than --max-rss-growth-mb, the descriptors
by more than --max-fd-growth, the task count by more than --max-task-growth, if any scrape
failed, or if the poll scheduler died.

    python benchmarks/soak.py                                   # 120 s, 60 org sets x 4 windows
    python benchmarks/soak.py --duration 300 --org-sets 100     # longer, more schedules
    python benchmarks/soak.py --duration 5 --org-sets 5         # a smoke run (the test suite does this)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp
from _common import PROXY_VARS, ROOT, child_env  # before `exporter`: puts this checkout on sys.path
from aiohttp import web

from exporter.config import parse_config
from exporter.logs import setup_logging
from exporter.plan import plan_of
from exporter.server import create_app
from exporter.service import Exporter

KEY: Final = "apk_user_soak"
WINDOWS: Final = ("1h", "24h", "7d", "30d", "90d", "today", "month_to_date", "billing_cycle")
RESERVOIR: Final = 10_000  # scrape latencies kept for the percentiles
# What the fault driver switches between; each holds for a random part of a fault period.
FAULT_MENU: Final[tuple[tuple[str, dict[str, object]], ...]] = (
    ("none", {}),
    ("none", {}),
    ("latency 50ms", {"latency": 0.05}),
    ("429 storm, Retry-After 1", {"status": 429, "retry_after": "1"}),
    ("503", {"status": 503}),
    ("malformed json", {"malformed": "json"}),
    ("timeouts", {"latency": 3.0}),  # longer than the 2 s request timeout
)


@dataclass
class Reading:
    rss_mb: float
    fds: int
    tasks: int

    def __str__(self) -> str:
        return f"rss={self.rss_mb:.1f} MiB  fds={self.fds}  asyncio_tasks={self.tasks}"


# A poll in flight is a task of its own ("poll ORG_SET/WINDOW"), there for the poll's duration:
# how many there are at a reading is chance, not growth. Every other task should stay put.
_POLL_TASK = re.compile(r"poll .+/")


def reading() -> Reading:
    gc.collect()
    status = Path("/proc/self/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    rss = int(match.group(1)) / 1024 if match else float("nan")
    tasks = sum(1 for task in asyncio.all_tasks() if not _POLL_TASK.match(task.get_name()))
    return Reading(rss, len(os.listdir("/proc/self/fd")), tasks)


@dataclass
class Scrapes:
    """Scrape outcomes; latencies are a fixed-size uniform sample, so the soak's own bookkeeping
    does not grow with the run and show up as the exporter's memory growth."""

    answered: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    slowest: float = 0.0
    _rng: random.Random = field(default_factory=lambda: random.Random(0))

    def record(self, seconds: float) -> None:
        self.answered += 1
        self.slowest = max(self.slowest, seconds)
        if len(self.latencies) < RESERVOIR:
            self.latencies.append(seconds)
        elif (slot := self._rng.randrange(self.answered)) < RESERVOIR:
            self.latencies[slot] = seconds

    def summary(self) -> str:
        ordered = sorted(self.latencies) or [float("nan")]

        def ms(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

        return (
            f"scrapes answered={self.answered} failed={self.failed}  latency p50={ms(0.5):.1f} ms "
            f"p99={ms(0.99):.1f} ms max={self.slowest * 1000:.1f} ms"
        )


def start_simulator(error_rate: float, seed: int) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter",
            "simulate",
            "--listen",
            "127.0.0.1:0",
            "--api-key",
            KEY,
            "--error-rate",
            str(error_rate),
            "--seed",
            str(seed),
        ],
        cwd=ROOT,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
    if match is None:
        proc.kill()
        raise SystemExit(f"soak: the simulator did not start: {line!r}")
    return proc, match.group(1)


def config_text(base_url: str, org_sets: int, windows: int, interval: str) -> str:
    sets = "".join(f"  - name: set-{i:03d}\n    org_ids: [org-{i}]\n" for i in range(org_sets))
    return f"""\
api:
  base_url: {base_url}
  api_key: {KEY}
  timeout: 2s
  retries: 2
  max_concurrency: 64
  max_requests_per_second: 5000
poll:
  interval: {interval}
  jitter: 0.1
  stale_after: 3
windows: [{", ".join(WINDOWS[:windows])}]
collectors: {{organizations: {{enabled: false}}, consumption: {{enabled: false}}}}
org_sets:
{sets}server:
  listen: 127.0.0.1:0
"""


async def drive_faults(
    session: aiohttp.ClientSession,
    sim_url: str,
    error_rate: float,
    period: float,
    stop: asyncio.Event,
    rng: random.Random,
    counts: dict[str, int],
) -> None:
    """Switch the simulator's faults at random; between faults it runs with just its error rate."""
    while not stop.is_set():
        name, fault = rng.choice(FAULT_MENU)
        counts[name] = counts.get(name, 0) + 1
        await session.delete(f"{sim_url}/-/faults")
        await session.post(f"{sim_url}/-/faults", json={"error_rate": error_rate, **fault})
        hold = rng.uniform(0.2, 0.6) * period if fault else period
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), hold)
        await session.post(
            f"{sim_url}/-/faults",
            json={**{k: None for k in ("status", "malformed")}, "latency": 0.0, "error_rate": error_rate},
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), period - hold if fault else 0)


async def scrape(session: aiohttp.ClientSession, url: str, stop: asyncio.Event, scrapes: Scrapes) -> None:
    headers = {"Accept-Encoding": "gzip"}  # what Prometheus sends
    while not stop.is_set():
        started = time.perf_counter()
        try:
            async with session.get(url, headers=headers) as response:
                body = await response.read()
                ok = response.status == 200 and b"devin_up" in body
        except aiohttp.ClientError:
            ok = False
        if ok:
            scrapes.record(time.perf_counter() - started)
        else:
            scrapes.failed += 1
        await asyncio.sleep(0)  # back to back, but let the poller run between scrapes


def attempts_by_outcome(exporter: Exporter) -> tuple[int, dict[str, int]]:
    total, _ = exporter.stats.attempts()
    reasons: dict[str, int] = {}
    for _, stats in exporter.stats.items():
        for counts in stats.by_collector.values():
            for reason, count in counts.reasons.items():
                reasons[reason] = reasons.get(reason, 0) + count
    return total, {k: v for k, v in sorted(reasons.items()) if v}


async def soak(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)  # failed polls log at warning: every injected fault would print
    for var in PROXY_VARS:  # loopback only: the exporter's session honours proxy variables
        os.environ.pop(var, None)
    rng = random.Random(args.seed)
    sim, sim_url = start_simulator(args.error_rate, args.seed)
    exporter = Exporter(
        parse_config(config_text(sim_url, args.org_sets, args.windows, args.interval), "soak.yaml", env={})
    )
    runner = web.AppRunner(create_app(exporter), access_log=None)
    stop = asyncio.Event()
    failures: list[str] = []
    try:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        schedules = len(plan_of(exporter.config).keys)
        print(
            f"soak: {args.org_sets} org sets x {args.windows} windows = {schedules} schedules every "
            f"{args.interval}, simulator error rate {args.error_rate}, for {args.duration:g}s "
            f"(warm-up {args.warmup:g}s)",
            flush=True,
        )
        start = reading()
        print(f"start:   {start}", flush=True)
        scrapes = Scrapes()
        fault_counts: dict[str, int] = {}
        began = time.monotonic()
        async with aiohttp.ClientSession() as session:
            workers = [
                asyncio.create_task(scrape(session, f"http://127.0.0.1:{port}/metrics", stop, scrapes)),
                asyncio.create_task(
                    drive_faults(
                        session, sim_url, args.error_rate, args.fault_period, stop, rng, fault_counts
                    )
                ),
            ]
            await asyncio.sleep(args.warmup)
            warm = reading()
            warm_attempts, _ = attempts_by_outcome(exporter)
            print(
                f"warm:    {warm}  (after {time.monotonic() - began:.0f}s, {warm_attempts} attempts)",
                flush=True,
            )
            await asyncio.sleep(max(0.0, args.duration - args.warmup))
            alive = exporter.alive()
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
        elapsed = time.monotonic() - began
        end = reading()
        attempts, reasons = attempts_by_outcome(exporter)
        print(f"end:     {end}  (after {elapsed:.0f}s)", flush=True)
        print(
            f"poll attempts={attempts} ({attempts / elapsed:.0f}/s)  errors by reason={json.dumps(reasons)}",
            flush=True,
        )
        print(scrapes.summary(), flush=True)
        print(f"faults switched on: {json.dumps(fault_counts, sort_keys=True)}", flush=True)
        grew = end.rss_mb - warm.rss_mb
        print(
            f"growth after warm-up: rss {grew:+.1f} MiB (max {args.max_rss_growth_mb:g}), "
            f"fds {end.fds - warm.fds:+d} (max {args.max_fd_growth}), "
            f"asyncio tasks {end.tasks - warm.tasks:+d} (max {args.max_task_growth})",
            flush=True,
        )
        if grew > args.max_rss_growth_mb:
            failures.append(f"RSS grew {grew:.1f} MiB after warm-up")
        if end.fds - warm.fds > args.max_fd_growth:
            failures.append(f"open file descriptors grew by {end.fds - warm.fds}")
        if end.tasks - warm.tasks > args.max_task_growth:
            failures.append(f"asyncio tasks grew by {end.tasks - warm.tasks}")
        if scrapes.failed or not scrapes.answered:
            failures.append(f"{scrapes.failed} scrapes failed, {scrapes.answered} answered")
        if not alive:
            failures.append("the poll scheduler was not running at the end")
        if attempts == 0:
            failures.append("no poll attempts were made")
    finally:
        stop.set()
        await runner.cleanup()
        sim.terminate()
        try:
            sim.wait(10)
        except subprocess.TimeoutExpired:
            sim.kill()
    for failure in failures:
        print(f"FAIL: {failure}", flush=True)
    print("soak: " + ("FAILED" if failures else "OK"), flush=True)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds to run (default 120)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds before the baseline reading (default: a third of the duration, at most 30)",
    )
    parser.add_argument("--org-sets", type=int, default=60, help="org sets (default 60)")
    parser.add_argument(
        "--windows",
        type=int,
        default=4,
        choices=range(1, len(WINDOWS) + 1),
        help="windows per org set (default 4)",
    )
    parser.add_argument("--interval", default="1s", help="poll interval of every window (default 1s)")
    parser.add_argument("--error-rate", type=float, default=0.05, help="simulator 500 rate (default 0.05)")
    parser.add_argument("--fault-period", type=float, default=3.0, help="seconds between fault switches")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--log-level",
        default="error",
        choices=("debug", "info", "warning", "error"),
        help="the exporter's log level (default error)",
    )
    parser.add_argument("--max-rss-growth-mb", type=float, default=16.0)
    parser.add_argument("--max-fd-growth", type=int, default=8)
    parser.add_argument("--max-task-growth", type=int, default=8)
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(30.0, args.duration / 3)
    if not 0 <= args.warmup < args.duration:
        parser.error("--warmup must be at least 0 and shorter than --duration")
    return asyncio.run(soak(args))


if __name__ == "__main__":
    raise SystemExit(main())
