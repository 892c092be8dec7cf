"""A small HTTP load generator, run as its own process so its CPU is not the server's.

    python benchmarks/_loadgen.py URL [URL ...] --requests 300 --warmup 20 --concurrency 1 [--header K:V ...]
        [--no-keepalive]

Keeps connections alive (as Prometheus does; --no-keepalive: a new connection per request, as a
one-off `curl` makes), reads every body in full without decompressing it,
and prints one JSON line: per URL, count, p50/p99/mean latency in ms, requests per second, body
bytes. Several URLs are requested in turn (a, b, a, b, ...), so a noisy moment on a shared machine
hits all of them alike instead of skewing whichever was measured then.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import aiohttp


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def run(urls: list[str], requests: int, warmup: int, concurrency: int,
              headers: dict[str, str], keepalive: bool = True) -> list[dict[str, float]]:
    latencies: list[list[float]] = [[] for _ in urls]
    sizes: list[list[int]] = [[] for _ in urls]
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=not keepalive)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                     skip_auto_headers=("Accept-Encoding",)) as session:
        async def one(target: int, record: bool) -> None:
            started = time.perf_counter()
            async with session.get(urls[target], headers=headers) as response:
                body = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{urls[target]}: HTTP {response.status}")
            if record:
                latencies[target].append(time.perf_counter() - started)
                sizes[target].append(len(body))

        for i in range(warmup * len(urls)):
            await one(i % len(urls), False)
        turn = 0
        total = requests * len(urls)

        async def worker() -> None:
            nonlocal turn
            while turn < total:
                target = turn % len(urls)
                turn += 1
                await one(target, True)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    out = []
    for lat, size in zip(latencies, sizes, strict=True):
        ordered = sorted(lat)
        out.append({
            "count": len(ordered),
            "p50": _quantile(ordered, 0.50) * 1000,
            "p99": _quantile(ordered, 0.99) * 1000,
            "mean": statistics.fmean(ordered) * 1000,
            # Each URL had its share of the run's time: requests / (the time its requests took in total).
            "rps": len(ordered) / (sum(ordered) / max(1e-9, sum(map(sum, latencies))) * elapsed),
            "bytes": statistics.fmean(size),
        })
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("urls", nargs="+", metavar="URL")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    parser.add_argument("--no-keepalive", action="store_true", help="a new connection for every request")
    args = parser.parse_args()
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    print(json.dumps(asyncio.run(run(args.urls, args.requests, args.warmup, args.concurrency, headers,
                                     keepalive=not args.no_keepalive))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
