"""Memory and CPU of the exporter at N org sets (API v3, every collector): RSS, CPU per cycle, CPU per idle minute.

Each N runs in a fresh process against the simulator (another process). The exporter polls
every schedule once (the first cycle), serves /metrics once in each format a Prometheus or a
person would ask for (so the caches are full), then sits idle — no poll due (1h interval), no
scrape — while its CPU time is measured and scaled to a minute. Then it re-polls every schedule
(a second full cycle, with caches warm) for CPU per cycle.

    python benchmarks/footprint.py                      # N = 10, 100, 1000; W = 4; 20 s idle
    python benchmarks/footprint.py --sizes 1000 --idle 60
"""

from __future__ import annotations

import asyncio
import gc
import json
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
    peak_rss_mb,
    rss_mb,
    run_child,
    sizes_and_latency,
    table,
    wait_first_cycle,
)
from aiohttp import ClientSession, web

from exporter.server import create_app
from exporter.service import Exporter

SCRAPES = (  # (Accept, Accept-Encoding): Prometheus (OpenMetrics, gzip), curl (text), a browser
    ("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5", "gzip"),
    ("", ""),
)


async def measure(sets: int, windows: int, latency: float, idle: float) -> dict[str, float]:
    with Simulator(latency, organizations=sets) as sim:
        config = bench_config(sim.url, sets, windows)
        exporter = Exporter(config)
        runner = web.AppRunner(create_app(exporter), access_log=None)
        await runner.setup()  # starts polling
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
        cpu = cpu_seconds()
        await wait_first_cycle(first_cycle_done(exporter, sets, windows), within=900)
        first_cycle_cpu = cpu_seconds() - cpu
        rss_polled = rss_mb()
        cpu = cpu_seconds()
        async with ClientSession(auto_decompress=False, skip_auto_headers=("Accept-Encoding",)) as http:
            for accept, encoding in SCRAPES:
                headers = {k: v for k, v in (("Accept", accept), ("Accept-Encoding", encoding)) if v}
                async with http.get(url, headers=headers) as response:
                    await response.read()
        first_scrapes_cpu = cpu_seconds() - cpu
        gc.collect()
        rss_scraped = rss_mb()
        # Idle: no poll due and nobody scraping. Wait in one sleep so the benchmark adds nothing.
        cpu, started = cpu_seconds(), time.monotonic()
        await asyncio.sleep(idle)
        idle_cpu_per_minute = (cpu_seconds() - cpu) / (time.monotonic() - started) * 60
        poller = exporter._poller
        assert poller is not None
        cpu = cpu_seconds()
        await poller.poll_all_once()
        cycle_cpu = cpu_seconds() - cpu
        result = {"sets": sets, "rss_polled": rss_polled, "rss_scraped": rss_scraped,
                  "peak_rss": peak_rss_mb(),
                  "first_cycle_cpu": first_cycle_cpu, "cycle_cpu": cycle_cpu,
                  "first_scrapes_cpu": first_scrapes_cpu, "idle_cpu_per_minute": idle_cpu_per_minute}
        await runner.cleanup()
        return result


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle CPU measurement")
    args = bench_args(parser)
    if args.child is not None:
        print(json.dumps(asyncio.run(measure(args.child, args.windows, args.latency, args.idle))))
        return 0
    sizes, latency = sizes_and_latency(args)
    idle = 0.5 if args.smoke else args.idle
    print(f"# footprint: API v3, every collector, W={args.windows}, L={latency * 1000:g} ms, "
          f"idle measured over {idle:g} s; {machine()}")
    rows = []
    for sets in sizes:
        r = run_child(Path(__file__), [str(sets), "--windows", str(args.windows), "--latency", str(latency),
                                       "--idle", str(idle)])
        rows.append([sets, f"{r['rss_polled']:.1f}", f"{r['rss_scraped']:.1f}", f"{r['peak_rss']:.1f}",
                     f"{r['first_cycle_cpu']:.2f}", f"{r['cycle_cpu']:.2f}", f"{r['first_scrapes_cpu']:.2f}",
                     f"{r['idle_cpu_per_minute']:.3f}"])
    print(table(["N sets", "RSS after 1st cycle MB", "RSS after scrapes MB", "peak RSS MB", "CPU 1st cycle s",
                 "CPU per cycle s", "CPU 1st scrapes s", "idle CPU s/min"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
