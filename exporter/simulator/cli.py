"""The `devin-usage-exporter simulate` command: serve the simulated API until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
from collections.abc import Sequence
from typing import cast

from exporter.simulator.app import DEFAULT_DEMO_KEY, CreateAppOptions, start_simulator, url
from exporter.simulator.faults import Faults
from exporter.simulator.v2 import USAGE_PATH

__all__ = ["main"]


def _listen_address(value: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT with a port from 0 to 65535, got {value!r}"
        )
    return host, int(port_text)


def _non_negative(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not (math.isfinite(number) and number >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value!r}")
    return number


def _share(value: str) -> float:
    number = _non_negative(value)
    if number > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value!r}")
    return number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devin-usage-exporter simulate",
        description="Serve a simulated Devin usage metrics API (GET "
        + USAGE_PATH
        + ") for demos and tests.",
    )
    parser.add_argument(
        "--listen",
        type=_listen_address,
        default=("127.0.0.1", 8080),
        metavar="HOST:PORT",
        help="address to serve on; port 0 picks a free port (default: 127.0.0.1:8080)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help=f"bearer token to accept (default: $DEVIN_API_KEY, else {DEFAULT_DEMO_KEY})",
    )
    parser.add_argument(
        "--latency", type=_non_negative, default=0.0, help="seconds added to every response"
    )
    parser.add_argument(
        "--error-rate", type=_share, default=0.0, help="share of requests answered 500, from 0 to 1"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the error-rate RNG (default: 0)"
    )
    return parser


async def _serve(host: str, port: int, options: CreateAppOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner, url = await start_simulator(host, port, **options)
    try:
        print(f"simulator listening on {url}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until SIGTERM or SIGINT; 0 on a clean stop, 1 if it cannot listen."""
    args = _parser().parse_args(argv)
    host, port = cast(tuple[str, int], args.listen)
    api_key = cast(str | None, args.api_key) or os.environ.get("DEVIN_API_KEY") or DEFAULT_DEMO_KEY
    options: CreateAppOptions = {
        "api_key": api_key,
        "faults": Faults(
            latency=cast(float, args.latency), error_rate=cast(float, args.error_rate)
        ),
        "seed": cast(int, args.seed),
    }
    try:
        asyncio.run(_serve(host, port, options))
    except OSError as exc:
        print(f"simulator: cannot listen on {url(host, port)}: {exc}", file=sys.stderr)
        return 1
    return 0
