"""/metrics latency and throughput at N org sets, versus the same bytes from a bare aiohttp handler.

Each N runs in a fresh exporter process (the daemon's real app, polling the simulator, which
runs in another process); a separate load-generator process scrapes it with keep-alive
connections, one request at a time, after a warm-up. In the same run and the same server, a
bare handler serves the bytes /metrics just returned (same headers), so the ratio is the
exporter's own cost per scrape. Then the exporter re-polls every schedule back to back (a poll
cycle that never ends) while /metrics is scraped again: scrapes must not get much slower, and
the poll cycles must not get slower either. The bare handler is scraped then too, in turn with
/metrics: it shows what any handler on the same event loop pays while the replies come in.

    python benchmarks/scrape.py                         # N = 10, 100, 1000; W = 4
    python benchmarks/scrape.py --sizes 1000 --requests 1000
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from _common import (
    ROOT,
    Simulator,
    bench_args,
    bench_config,
    bench_parser,
    child_env,
    machine,
    run_child,
    sizes_and_latency,
    table,
    wait_first_cycle,
)
from aiohttp import ClientSession, web

from exporter.server import create_app
from exporter.service import Exporter

LOADGEN = Path(__file__).with_name("_loadgen.py")
# What Prometheus 2.x and 3.x ask for first: OpenMetrics (the Python client negotiates 1.0.0).
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
VARIANTS = {  # name -> request headers
    "text": {},
    "text+gzip": {"Accept-Encoding": "gzip"},
    "openmetrics": {"Accept": PROMETHEUS_ACCEPT},
    "openmetrics+gzip": {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"},
}


async def loadgen(urls: list[str], headers: dict[str, str], requests: int, warmup: int,
                  concurrency: int) -> list[dict[str, float]]:
    args = [sys.executable, str(LOADGEN), *urls, "--requests", str(requests), "--warmup", str(warmup),
            "--concurrency", str(concurrency)]
    for name, value in headers.items():
        args += ["--header", f"{name}:{value}"]
    proc = await asyncio.create_subprocess_exec(*args, cwd=ROOT, env=child_env(),
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {stderr.decode()}")
    return json.loads(stdout)  # type: ignore[no-any-return]


async def measure(sets: int, windows: int, latency: float, requests: int, warmup: int,
                  concurrency: int) -> dict[str, object]:
    bare: dict[str, tuple[bytes, dict[str, str]]] = {}

    async def bare_handler(request: web.Request) -> web.Response:
        body, headers = bare[request.match_info["variant"]]
        return web.Response(body=body, headers=headers)

    with Simulator(latency) as sim:
        config = bench_config(sim.url, sets, windows)
        exporter = Exporter(config)
        app = create_app(exporter)
        app.router.add_get("/bare/{variant}", bare_handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()  # starts polling
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        schedules = sets * windows
        attempts = exporter.stats.version
        started = time.perf_counter()
        await wait_first_cycle(lambda: exporter.stats.version - attempts >= schedules
                               and exporter.ready(), within=600)
        first_cycle = time.perf_counter() - started
        results: dict[str, object] = {"sets": sets, "first_cycle": first_cycle}
        async with ClientSession(auto_decompress=False, skip_auto_headers=("Accept-Encoding",)) as http:
            for variant, headers in VARIANTS.items():
                async with http.get(f"{base}/metrics", headers=headers) as response:
                    copied = {k: response.headers[k] for k in ("Content-Type", "Content-Encoding")
                              if k in response.headers}
                    bare[variant] = (await response.read(), copied)
        for variant, headers in VARIANTS.items():
            urls = [f"{base}/metrics", f"{base}/bare/{variant}"]
            ours, bare_result = await loadgen(urls, headers, requests, warmup, concurrency)
            results[f"{variant}/metrics"], results[f"{variant}/bare"] = ours, bare_result
        # Scrapes during polling: every schedule re-polled back to back until the scrapes are done.
        poller = exporter._poller
        assert poller is not None
        cycles: list[float] = []
        stop = asyncio.Event()

        async def poll_forever() -> None:
            while not stop.is_set():
                began = time.perf_counter()
                await poller.poll_all_once()
                cycles.append(time.perf_counter() - began)

        polling = asyncio.create_task(poll_forever())
        for variant in ("text", "openmetrics+gzip"):
            results[f"{variant}/polling"], results[f"{variant}/bare polling"] = await loadgen(
                [f"{base}/metrics", f"{base}/bare/{variant}"], VARIANTS[variant], requests, warmup, concurrency)
        stop.set()
        await polling
        results["cycles_while_scraped"] = cycles
        await runner.cleanup()
    return results


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--requests", type=int, default=300, help="scrapes per measurement")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=1, help="scrapes in flight at once")
    args = bench_args(parser)
    if args.child is not None:
        result = asyncio.run(measure(args.child, args.windows, args.latency, args.requests, args.warmup,
                                     args.concurrency))
        print(json.dumps(result))
        return 0
    sizes, latency = sizes_and_latency(args)
    requests, warmup = (5, 1) if args.smoke else (args.requests, args.warmup)
    print(f"# scrape: W={args.windows}, L={latency * 1000:g} ms, {requests} scrapes after {warmup} warm-up, "
          f"concurrency {args.concurrency}; {machine()}")
    rows, polling_rows = [], []
    for sets in sizes:
        r = run_child(Path(__file__), [str(sets), "--windows", str(args.windows), "--latency", str(latency),
                                       "--requests", str(requests), "--warmup", str(warmup),
                                       "--concurrency", str(args.concurrency)])
        for variant in VARIANTS:
            ours, bare = r[f"{variant}/metrics"], r[f"{variant}/bare"]
            assert isinstance(ours, dict) and isinstance(bare, dict)
            rows.append([sets, variant, f"{ours['bytes'] / 1024:.0f}",
                         f"{ours['p50']:.2f}", f"{ours['p99']:.2f}", f"{ours['rps']:.0f}",
                         f"{bare['p50']:.2f}", f"{bare['p99']:.2f}", f"{bare['rps']:.0f}",
                         f"{ours['p50'] / bare['p50']:.2f}", f"{ours['p99'] / bare['p99']:.2f}"])
        cycles = r["cycles_while_scraped"]
        assert isinstance(cycles, list)
        first = float(r["first_cycle"])  # type: ignore[arg-type]
        for variant in ("text", "openmetrics+gzip"):
            idle, busy, bare_busy = r[f"{variant}/metrics"], r[f"{variant}/polling"], r[f"{variant}/bare polling"]
            assert isinstance(idle, dict) and isinstance(busy, dict) and isinstance(bare_busy, dict)
            polling_rows.append([sets, variant, f"{idle['p50']:.2f}", f"{idle['p99']:.2f}",
                                 f"{busy['p50']:.2f}",
                                 f"{busy['p99']:.2f}", f"{busy['p50'] / idle['p50']:.2f}",
                                 f"{busy['p99'] / idle['p99']:.2f}", f"{bare_busy['p99']:.2f}",
                                 f"{busy['p99'] / bare_busy['p99']:.2f}", f"{first:.2f}",
                                 f"{max(cycles):.2f}" if cycles else "-", len(cycles)])
    print(table(["N sets", "variant", "body KiB", "/metrics p50 ms", "p99 ms", "req/s",
                 "bare p50 ms", "p99 ms",
                 "req/s", "p50 ratio", "p99 ratio"], rows))
    print()
    print(table(["N sets", "variant", "idle p50 ms", "idle p99 ms", "polling p50 ms", "polling p99 ms",
                 "p50 ratio", "p99 ratio", "bare polling p99 ms", "p99 vs bare polling", "first cycle s",
                 "slowest cycle while scraped s", "cycles"],
                polling_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
