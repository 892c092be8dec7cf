"""/metrics latency at N org sets (API v3, every collector), versus the same bytes from a bare aiohttp server.

Each N runs in a fresh exporter process (the daemon's real app, polling the simulator, which
runs in another process). After the first poll cycle, the bytes /metrics returned in each variant
(text, OpenMetrics as Prometheus asks, each plain and gzip) go to a bare aiohttp server in a
process of its own, whose handler only answers with them (same headers). A load-generator process
scrapes both, in turn, one request at a time over keep-alive connections after a warm-up; then
plain text again with a new connection per request (a one-off `curl`). The ratio of the two is
the exporter's own cost per scrape. Then the exporter re-polls every schedule back to back (a poll
cycle that never ends) while /metrics is scraped again, against the idle figures.

    python benchmarks/scrape.py                         # N = 10, 100, 1000; W = 4
    python benchmarks/scrape.py --sizes 1000 --requests 1000
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    ROOT,
    Simulator,
    bench_args,
    bench_config,
    bench_parser,
    child_env,
    first_cycle_done,
    machine,
    run_child,
    sizes_and_latency,
    table,
    wait_first_cycle,
    write_json,
)
from aiohttp import ClientSession, web

from exporter.server import create_app
from exporter.service import Exporter

LOADGEN = Path(__file__).with_name("_loadgen.py")
BARE = Path(__file__).with_name("_bare.py")
ONE_OFF = "text, no keep-alive"
POLLING_VARIANTS = ("text", "openmetrics+gzip")
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
                  concurrency: int, *, keepalive: bool = True) -> list[dict[str, float]]:
    args = [sys.executable, str(LOADGEN), *urls, "--requests", str(requests), "--warmup", str(warmup),
            "--concurrency", str(concurrency), *(() if keepalive else ("--no-keepalive",))]
    for name, value in headers.items():
        args += ["--header", f"{name}:{value}"]
    proc = await asyncio.create_subprocess_exec(*args, cwd=ROOT, env=child_env(),
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {stderr.decode()}")
    return json.loads(stdout)  # type: ignore[no-any-return]


class Bare:
    """benchmarks/_bare.py in its own process, serving the bodies /metrics returned."""

    def __init__(self, bodies: dict[str, tuple[bytes, dict[str, str]]]) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="bare-")
        for name, (body, headers) in bodies.items():
            Path(self.dir.name, f"{name}.body").write_bytes(body)
            Path(self.dir.name, f"{name}.json").write_text(json.dumps(headers))
        self.proc = subprocess.Popen([sys.executable, str(BARE), self.dir.name], cwd=ROOT, env=child_env(),
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        if match is None:
            self.proc.kill()
            raise RuntimeError(f"bare server did not start: {line!r}")
        self.url = match.group(1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.dir.cleanup()


async def measure(sets: int, windows: int, latency: float, requests: int, warmup: int,
                  concurrency: int) -> dict[str, object]:
    with Simulator(latency, organizations=sets) as sim:
        config = bench_config(sim.url, sets, windows)
        exporter = Exporter(config)
        runner = web.AppRunner(create_app(exporter), access_log=None)
        await runner.setup()  # starts polling
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        started = time.perf_counter()
        await wait_first_cycle(first_cycle_done(exporter, sets, windows), within=900)
        first_cycle = time.perf_counter() - started
        results: dict[str, object] = {"sets": sets, "first_cycle": first_cycle}
        bodies: dict[str, tuple[bytes, dict[str, str]]] = {}
        async with ClientSession(auto_decompress=False, skip_auto_headers=("Accept-Encoding",)) as http:
            for variant, headers in VARIANTS.items():
                async with http.get(f"{base}/metrics", headers=headers) as response:
                    copied = {k: response.headers[k] for k in ("Content-Type", "Content-Encoding")
                              if k in response.headers}
                    bodies[variant] = (await response.read(), copied)
        bare = Bare(bodies)
        try:
            for variant, headers in VARIANTS.items():
                ours, theirs = await loadgen([f"{base}/metrics", f"{bare.url}/{variant}"], headers, requests,
                                             warmup, concurrency)
                results[f"{variant}/metrics"], results[f"{variant}/bare"] = ours, theirs
            # A one-off scrape (curl): plain text, a new connection each time; fewer, as each is a connect.
            ours, theirs = await loadgen([f"{base}/metrics", f"{bare.url}/text"], {}, max(5, requests // 3),
                                         max(1, warmup // 3), concurrency, keepalive=False)
            results[f"{ONE_OFF}/metrics"], results[f"{ONE_OFF}/bare"] = ours, theirs
        finally:
            bare.stop()
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
        for variant in POLLING_VARIANTS:
            (results[f"{variant}/polling"],) = await loadgen([f"{base}/metrics"], VARIANTS[variant], requests,
                                                             warmup, concurrency)
        stop.set()
        await polling
        results["cycles_while_scraped"] = cycles
        await runner.cleanup()
    return results


def run(sizes: list[int], windows: int, latency: float, requests: int, warmup: int,
        concurrency: int) -> list[dict[str, object]]:
    """Each size in a fresh process; the raw figures."""
    return [run_child(Path(__file__), [str(sets), "--windows", str(windows), "--latency", str(latency),
                                       "--requests", str(requests), "--warmup", str(warmup),
                                       "--concurrency", str(concurrency)])
            for sets in sizes]


def tables(results: list[dict[str, object]]) -> str:
    rows, polling_rows = [], []
    for r in results:
        sets = r["sets"]
        for variant in (*VARIANTS, ONE_OFF):
            ours, bare = r[f"{variant}/metrics"], r[f"{variant}/bare"]
            assert isinstance(ours, dict) and isinstance(bare, dict)
            rows.append([sets, variant, f"{ours['bytes'] / 1024:.0f}",
                         f"{ours['p50']:.2f}", f"{ours['p99']:.2f}", f"{ours['rps']:.0f}",
                         f"{bare['p50']:.2f}", f"{bare['p99']:.2f}", f"{bare['rps']:.0f}",
                         f"{ours['p50'] / bare['p50']:.2f}", f"{ours['p99'] / bare['p99']:.2f}"])
        cycles = r["cycles_while_scraped"]
        assert isinstance(cycles, list)
        first = float(r["first_cycle"])  # type: ignore[arg-type]
        for variant in POLLING_VARIANTS:
            idle, busy = r[f"{variant}/metrics"], r[f"{variant}/polling"]
            assert isinstance(idle, dict) and isinstance(busy, dict)
            polling_rows.append([sets, variant, f"{idle['p50']:.2f}", f"{idle['p99']:.2f}",
                                 f"{busy['p50']:.2f}", f"{busy['p99']:.2f}", f"{busy['p50'] / idle['p50']:.2f}",
                                 f"{busy['p99'] / idle['p99']:.2f}", f"{first:.2f}",
                                 f"{max(cycles):.2f}" if cycles else "-", len(cycles)])
    return "\n".join([
        table(["N sets", "variant", "body KiB", "/metrics p50 ms", "p99 ms", "req/s", "bare p50 ms", "p99 ms",
               "req/s", "p50 ratio", "p99 ratio"], rows),
        "",
        table(["N sets", "variant", "idle p50 ms", "idle p99 ms", "polling p50 ms", "polling p99 ms",
               "p50 ratio", "p99 ratio", "first cycle s", "slowest cycle while scraped s", "cycles"],
              polling_rows),
    ])


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
    print(f"# scrape: API v3, every collector, W={args.windows}, L={latency * 1000:g} ms, {requests} scrapes after "
          f"{warmup} warm-up, concurrency {args.concurrency}; {machine()}")
    results = run(sizes, args.windows, latency, requests, warmup, args.concurrency)
    write_json(args, results)
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
