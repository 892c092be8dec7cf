"""First full poll cycle of N org sets x W windows on API v3, every collector on, versus its lower bound.

Each N runs in a fresh process; the simulator runs in another, with `--latency L` and one
organization per org set. With no jitter every schedule is due at start, so the cycle takes at
least ceil(R / C) * L, where R is the fewest requests one cycle needs (usage 3 per org set and
window, active users 1, consumption 1 per org set and consumption window, the organizations list's
pages and the billing cycles, the queue), C requests are in flight and each takes L; or
R / max_requests_per_second if the rate limit binds. The ratio to that bound is the exporter's
own overhead: client, poller, snapshot updates. The simulator's request log gives the requests
each collector made, against the minimum, and how many asked again what an earlier one asked.

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
    first_cycle_done,
    machine,
    minimum_requests,
    peak_rss_mb,
    requests_by_collector,
    rss_mb,
    run_child,
    sizes_and_latency,
    table,
    wait_first_cycle,
    write_json,
)

from exporter.plan import plan_of
from exporter.service import Exporter
from exporter.transport import CONNECTOR_LIMIT


async def measure(sets: int, windows: int, concurrency: int, latency: float, rps: float) -> dict[str, object]:
    with Simulator(latency, organizations=sets) as sim:
        config = bench_config(sim.url, sets, windows, concurrency=concurrency, rps=rps)
        exporter = Exporter(config)
        keys = plan_of(config).keys
        done = first_cycle_done(exporter, sets, windows)

        sim_cpu, cpu = sim.cpu_seconds(), cpu_seconds()
        started = time.perf_counter()
        await exporter.start()
        await wait_first_cycle(done, within=900)
        elapsed = time.perf_counter() - started
        cpu, sim_cpu = cpu_seconds() - cpu, sim.cpu_seconds() - sim_cpu
        snap = exporter.snapshot
        failed = sum(not snap.result(k.org_set, *k.slot).ok for k in plan_of(snap.config).keys)
        # What each request took as the exporter saw it: the simulator's L plus its own queueing.
        attempts, seconds = exporter.stats.attempts()
        requests, repeats = requests_by_collector(await sim.requests())
        result = {"sets": sets, "windows": windows, "schedules": len(keys), "seconds": elapsed,
                  "cpu": cpu, "sim_cpu": sim_cpu, "failed": failed, "latency": seconds / max(1, attempts),
                  "attempts": attempts, "requests": requests, "repeats": repeats,
                  "minimum": minimum_requests(sets, windows, organizations=sets),
                  "rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb()}
        await exporter.close()
        return result


def lower_bound(requests: int, concurrency: int, latency: float, rps: float) -> float:
    in_flight = min(concurrency, CONNECTOR_LIMIT)
    return max(math.ceil(requests / in_flight) * latency, requests / rps)


def run(sizes: list[int], windows: int, concurrency: int, latency: float, rps: float) -> list[dict[str, object]]:
    """Each size in a fresh process; the raw figures."""
    return [run_child(Path(__file__), [str(sets), "--windows", str(windows), "--concurrency", str(concurrency),
                                       "--latency", str(latency), "--rps", str(rps)])
            for sets in sizes]


def tables(results: list[dict[str, object]], concurrency: int, latency: float, rps: float) -> str:
    rows, per_collector = [], []
    for r in results:
        minimum: dict[str, int] = r["minimum"]  # type: ignore[assignment]
        requests: dict[str, int] = r["requests"]  # type: ignore[assignment]
        repeats: dict[str, int] = r["repeats"]  # type: ignore[assignment]
        needed = sum(minimum.values())
        bound = lower_bound(needed, concurrency, latency, rps)
        seconds = float(r["seconds"])  # type: ignore[arg-type]
        cpu = float(r["cpu"])  # type: ignore[arg-type]
        observed = float(r["latency"])  # type: ignore[arg-type]
        observed_bound = lower_bound(needed, concurrency, observed, rps)
        made = sum(requests.values())
        rows.append([r["sets"], r["schedules"], needed, made, f"{bound:.2f}", f"{seconds:.2f}",
                     f"{seconds / bound:.3f}", f"{observed * 1000:.1f}", f"{seconds / observed_bound:.3f}",
                     f"{cpu:.2f}", f"{cpu / max(1, made) * 1000:.2f}",
                     f"{float(r['sim_cpu']):.2f}",  # type: ignore[arg-type]
                     r["failed"], f"{float(r['rss_mb']):.1f}"])  # type: ignore[arg-type]
        for name, least in minimum.items():
            per_collector.append([r["sets"], name, least, requests.get(name, 0),
                                  f"{requests.get(name, 0) / least:.3f}", repeats.get(name, 0)])
    return "\n".join([
        table(["N sets", "schedules", "R (minimum)", "requests made", "bound s", "first cycle s", "ratio",
               "observed L ms", "ratio to observed L", "exporter CPU s", "CPU ms/request", "simulator CPU s",
               "failed", "RSS MB"], rows),
        "",
        table(["N sets", "collector", "minimum requests", "requests made", "ratio", "repeated"], per_collector),
    ])


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
    print(f"# poll_cycle: API v3, every collector, W={args.windows}, C={args.concurrency} "
          f"(connector limit {CONNECTOR_LIMIT}), L={latency * 1000:g} ms, "
          f"max_requests_per_second={args.rps:g}; {machine()}")
    results = run(sizes, args.windows, args.concurrency, latency, args.rps)
    write_json(args, results)
    print(tables(results, args.concurrency, latency, args.rps))
    return 0 if all(r["failed"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
