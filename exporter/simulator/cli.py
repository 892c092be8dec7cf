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

from exporter.simulator.app import (
    DEFAULT_DEMO_KEY,
    DEFAULT_V3_TOKEN,
    V3_TOKEN_PREFIX,
    CreateAppOptions,
    start_simulator,
    url,
)
from exporter.simulator.faults import Faults

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


def _v2_key(value: str) -> str:
    if value.startswith(V3_TOKEN_PREFIX):
        raise argparse.ArgumentTypeError(f"a {V3_TOKEN_PREFIX} token is for /v3 paths: give it as --v3-token")
    return value


def _v3_token(value: str) -> str:
    if not value.startswith(V3_TOKEN_PREFIX):
        raise argparse.ArgumentTypeError(f"v3 service-user tokens start with {V3_TOKEN_PREFIX}, got one that does not")
    return value


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value!r}")
    return int(value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devin-usage-exporter simulate",
        description="Serve a simulated Devin enterprise API (v2 under /v2/enterprise, v3 under "
        "/v3/enterprise: usage and other metrics, consumption, organizations, queue) for demos "
        "and tests, with faults switchable at /-/faults.",
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
        type=_v2_key,
        default=None,
        metavar="KEY",
        help=f"bearer token /v2 paths accept (default: $DEVIN_API_KEY unless it is a {V3_TOKEN_PREFIX} token, "
        f"else {DEFAULT_DEMO_KEY})",
    )
    parser.add_argument(
        "--v3-token",
        type=_v3_token,
        default=None,
        metavar="TOKEN",
        help=f"bearer token /v3 paths accept, {V3_TOKEN_PREFIX}... (default: $DEVIN_API_KEY if it is a "
        f"{V3_TOKEN_PREFIX} token, else {DEFAULT_V3_TOKEN})",
    )
    parser.add_argument(
        "--page-size",
        type=_positive_int,
        default=2,
        metavar="N",
        help="most items a list page holds, whatever a client asks for (default: 2)",
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
    # One environment variable serves either version, as the exporter's own does.
    env_key = os.environ.get("DEVIN_API_KEY") or None
    env_is_v3 = env_key is not None and env_key.startswith(V3_TOKEN_PREFIX)
    options: CreateAppOptions = {
        "api_key": cast(str | None, args.api_key) or (None if env_is_v3 else env_key) or DEFAULT_DEMO_KEY,
        "v3_token": cast(str | None, args.v3_token) or (env_key if env_is_v3 else None) or DEFAULT_V3_TOKEN,
        "faults": Faults(latency=cast(float, args.latency), error_rate=cast(float, args.error_rate)),
        "seed": cast(int, args.seed),
        "page_size": cast(int, args.page_size),
    }
    try:
        asyncio.run(_serve(host, port, options))
    except OSError as exc:
        print(f"simulator: cannot listen on {url(host, port)}: {exc}", file=sys.stderr)
        return 1
    return 0
