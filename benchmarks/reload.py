"""A SIGHUP reload of the running daemon at N org sets (API v3, every collector) while Prometheus scrapes it.

The daemon (`python -m exporter --config FILE`) and the simulator each run in a process of their
own; this process scrapes /metrics as Prometheus does (OpenMetrics, gzip), one scrape after the
other. Once the first poll cycle is done, it scrapes for a few seconds (the baseline), rewrites the
config with one org set more and sends SIGHUP, and goes on scraping until the reload shows in
/metrics and the new org set's series are there, and a few seconds beyond. The figure that
matters is the slowest scrape after the SIGHUP: a reload must not hold scrapes up.

    python benchmarks/reload.py                  # N = 1000, W = 4
    python benchmarks/reload.py --sizes 100,1000
"""

from __future__ import annotations

import asyncio
import gzip
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from _common import (
    ROOT,
    Simulator,
    bench_args,
    bench_parser,
    child_env,
    config_text,
    machine,
    process_cpu_seconds,
    sizes_and_latency,
    table,
    write_json,
)

from exporter.config import parse_config
from exporter.plan import plan_of

ACCEPT = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
RELOADED = re.compile(rb"^devin_exporter_config_last_reload_success_timestamp_seconds (\S+)$", re.MULTILINE)
LAST_SUCCESS = b"devin_collector_last_success_timestamp_seconds{"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_config(path: Path, base_url: str, sets: int, windows: int, port: int) -> int:
    """Write the daemon's config; its number of schedules."""
    path.write_text(config_text(base_url, sets, windows, listen=f"127.0.0.1:{port}"))
    return len(plan_of(parse_config(path.read_text(), str(path), env={})).keys)


def start_daemon(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "exporter", "--config", str(config), "--log-level", "warning"],
                            cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def scrape(http: aiohttp.ClientSession, url: str) -> tuple[float, bytes]:
    started = time.perf_counter()
    async with http.get(url, headers={"Accept": ACCEPT, "Accept-Encoding": "gzip"}) as response:
        body = await response.read()
        if response.status != 200:
            raise RuntimeError(f"/metrics: HTTP {response.status}")
    return time.perf_counter() - started, gzip.decompress(body)


async def measure(sets: int, windows: int, latency: float, baseline: float, after: float) -> dict[str, object]:
    with Simulator(latency, organizations=sets + 1) as sim, tempfile.TemporaryDirectory() as tmp:
        path, port = Path(tmp, "config.yaml"), free_port()
        schedules = write_config(path, sim.url, sets, windows, port)
        daemon = start_daemon(path)
        url = f"http://127.0.0.1:{port}/metrics"
        try:
            async with aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=("Accept-Encoding",)) as http:
                started = time.perf_counter()
                while True:  # every schedule has a last success: the first cycle is done
                    try:
                        _, body = await scrape(http, url)
                    except aiohttp.ClientConnectionError:
                        body = b""
                    if body.count(LAST_SUCCESS) >= schedules:
                        break
                    if time.perf_counter() - started > 900 or daemon.poll() is not None:
                        raise RuntimeError("the first cycle did not finish")
                    await asyncio.sleep(1.0)
                first_cycle = time.perf_counter() - started
                quiet: list[float] = []
                until = time.perf_counter() + baseline
                while time.perf_counter() < until:
                    seconds, body = await scrape(http, url)
                    quiet.append(seconds)
                stamp = RELOADED.search(body)
                rss_before, cpu_before = rss_mb(daemon.pid), process_cpu_seconds(daemon.pid)
                write_config(path, sim.url, sets + 1, windows, port)
                reloading: list[float] = []
                sent = time.perf_counter()
                daemon.send_signal(signal.SIGHUP)
                applied: float | None = None
                new_set = f'org="org-set-{sets:04d}"'.encode()
                while applied is None or time.perf_counter() < applied + after:
                    seconds, body = await scrape(http, url)
                    reloading.append(seconds)
                    now = RELOADED.search(body)
                    if applied is None and now and stamp and now.group(1) != stamp.group(1) and new_set in body:
                        applied = time.perf_counter()
                    if time.perf_counter() - sent > 300:
                        raise RuntimeError("the reload did not show within 300 s")
                assert applied is not None
                result = {"sets": sets, "schedules": schedules, "first_cycle": first_cycle,
                          "quiet": quiet, "reloading": reloading, "applied_after": applied - sent,
                          "reload_cpu": process_cpu_seconds(daemon.pid) - cpu_before,
                          "rss_before": rss_before, "rss_after": rss_mb(daemon.pid)}
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
    return result


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def tables(results: list[dict[str, object]]) -> str:
    rows = []
    for r in results:
        quiet, reloading = r["quiet"], r["reloading"]
        assert isinstance(quiet, list) and isinstance(reloading, list)
        rows.append([r["sets"], r["schedules"], f"{_ms(quiet, 0.5):.2f}", f"{_ms(quiet, 0.99):.2f}",
                     f"{max(quiet) * 1000:.1f}", len(reloading), f"{_ms(reloading, 0.5):.2f}",
                     f"{_ms(reloading, 0.99):.2f}", f"{max(reloading) * 1000:.1f}",
                     f"{float(r['applied_after']):.2f}", f"{float(r['reload_cpu']):.2f}",  # type: ignore[arg-type]
                     f"{float(r['rss_before']):.1f}", f"{float(r['rss_after']):.1f}"])  # type: ignore[arg-type]
    return table(["N sets", "schedules", "quiet p50 ms", "quiet p99 ms", "quiet max ms", "scrapes while reloading",
                  "p50 ms", "p99 ms", "max scrape delay ms", "reload shown after s", "reload CPU s",
                  "daemon RSS before MB", "after MB"], rows)


def main() -> int:
    parser = bench_parser(__doc__)
    parser.set_defaults(sizes="1000")
    parser.add_argument("--baseline", type=float, default=5.0, help="seconds of scrapes before the SIGHUP")
    parser.add_argument("--after", type=float, default=5.0, help="seconds of scrapes after the reload shows")
    args = bench_args(parser)
    sizes, latency = sizes_and_latency(args)
    baseline, after = (0.5, 0.5) if args.smoke else (args.baseline, args.after)
    print(f"# reload: API v3, every collector, W={args.windows}, L={latency * 1000:g} ms, SIGHUP adding one org set "
          f"while scraped as Prometheus (OpenMetrics, gzip) back to back; {machine()}")
    results = [asyncio.run(measure(sets, args.windows, latency, baseline, after)) for sets in sizes]
    write_json(args, results)
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
