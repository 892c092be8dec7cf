"""First full poll cycle of N org sets x W windows against the simulator, versus its lower bound.

Each N runs in a fresh process; the simulator runs in another, with `--latency L`. With no jitter
every schedule is due at start, so the cycle takes at least ceil(N*W / C) * L (C requests in flight,
each taking L), or N*W / max_requests_per_second if the rate limit binds. The ratio to that bound
is the exporter's own overhead: client, poller, snapshot updates.

    python benchmarks/poll_cycle.py                     # N = 10, 100, 1000; W = 4; C = 32; L = 50 ms
    python benchmarks/poll_cycle.py --sizes 1000 --rps 500
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from pathlib import Path

from _common import (
    Simulator,
    bench_args,
    bench_config,
    bench_parser,
    cpu_seconds,
    machine,
    peak_rss_mb,
    rss_mb,
    run_child,
    sizes_and_latency,
    table,
    wait_first_cycle,
)

from exporter.plan import plan_of
from exporter.service import Exporter
from exporter.transport import CONNECTOR_LIMIT


async def measure(sets: int, windows: int, concurrency: int, latency: float, rps: float) -> dict[str, object]:
    with Simulator(latency) as sim:
        config = bench_config(sim.url, sets, windows, concurrency=concurrency, rps=rps)
        exporter = Exporter(config)
        schedules = sets * windows

        attempts = exporter.stats.version  # +1 per attempt; with retries: 0, one per schedule

        def done() -> bool:
            # The cheap counter first: scanning every schedule each millisecond would be most of
            # the CPU measured at N = 1000.
            if exporter.stats.version - attempts < schedules:
                return False
            snap = exporter.snapshot
            return all(snap.result(k.org_set, *k.slot).last_attempt is not None for k in plan_of(snap.config).keys)

        sim_cpu, cpu = sim.cpu_seconds(), cpu_seconds()
        started = time.perf_counter()
        await exporter.start()
        await wait_first_cycle(done, within=600)
        elapsed = time.perf_counter() - started
        cpu, sim_cpu = cpu_seconds() - cpu, sim.cpu_seconds() - sim_cpu
        snap = exporter.snapshot
        failed = sum(not snap.result(k.org_set, *k.slot).ok for k in plan_of(snap.config).keys)
        # What each request took as the exporter saw it: the simulator's L plus its own queueing.
        attempts, seconds = exporter.stats.attempts()
        latency = seconds / max(1, attempts)
        result = {"sets": sets, "windows": windows, "schedules": schedules, "seconds": elapsed,
                  "cpu": cpu, "sim_cpu": sim_cpu, "failed": failed, "latency": latency, "rss_mb": rss_mb(),
                  "peak_rss_mb": peak_rss_mb()}
        await exporter.close()
        return result


def lower_bound(schedules: int, concurrency: int, latency: float, rps: float) -> float:
    in_flight = min(concurrency, CONNECTOR_LIMIT)
    return max(math.ceil(schedules / in_flight) * latency, schedules / rps)


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rps", type=float, default=1_000_000, help="max_requests_per_second")
    args = bench_args(parser)
    if args.child is not None:
        result = asyncio.run(measure(args.child, args.windows, args.concurrency, args.latency, args.rps))
        print(json.dumps(result))
        return 0
    sizes, latency = sizes_and_latency(args)
    print(f"# poll_cycle: W={args.windows}, C={args.concurrency} (connector limit {CONNECTOR_LIMIT}), "
          f"L={latency * 1000:g} ms, max_requests_per_second={args.rps:g}; {machine()}")
    rows = []
    for sets in sizes:
        r = run_child(Path(__file__), [str(sets), "--windows", str(args.windows),
                                       "--concurrency", str(args.concurrency), "--latency", str(latency),
                                       "--rps", str(args.rps)])
        schedules = int(r["schedules"])  # type: ignore[call-overload]
        bound = lower_bound(schedules, args.concurrency, latency, args.rps)
        seconds = float(r["seconds"])  # type: ignore[arg-type]
        cpu = float(r["cpu"])  # type: ignore[arg-type]
        observed = float(r["latency"])  # type: ignore[arg-type]
        observed_bound = lower_bound(schedules, args.concurrency, observed, args.rps)
        rows.append([sets, schedules, f"{bound:.3f}", f"{seconds:.3f}", f"{seconds / bound:.3f}",
                     f"{observed * 1000:.1f}", f"{seconds / observed_bound:.3f}",
                     f"{cpu:.2f}", f"{cpu / schedules * 1000:.2f}",
                     f"{float(r['sim_cpu']):.2f}",  # type: ignore[arg-type]
                     r["failed"], f"{float(r['rss_mb']):.1f}"])  # type: ignore[arg-type]
    print(table(["N sets", "requests", "bound s", "first cycle s", "ratio", "observed L ms",
                 "ratio to observed L", "exporter CPU s",
                 "CPU ms/request", "simulator CPU s", "failed", "RSS MB"], rows))
    return 0 if all(row[10] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
