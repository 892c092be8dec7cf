"""The simulator as the benchmarks run it, in its own process: N organizations, full pages, every request logged.

    python benchmarks/_simulator.py --organizations 1000 --latency 0.05 --v3-token cog_... --api-key apk_...

Prints `simulator listening on URL`, then serves until SIGTERM. Unlike `devin-usage-exporter
simulate`, the enterprise has `--organizations` organizations (org-0, org-1, ...), so that every
benchmark org set's `org_ids: [org-I]` is a real organization (its consumption exists, the
organizations list has N entries); pages hold up to 200 items, as the exporter asks (the
simulator's default of 2 exists to make tests follow pages); and the request log keeps every
request of a cycle (GET /-/requests), so a benchmark can count them per collector.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys

from _serve import serve_until_signalled

from exporter.simulator import REQUESTS_KEY, Faults, Organization, create_app

PAGE_SIZE = 200  # what the exporter asks for (`first=200`)
RECORDED = 200_000  # requests kept: more than one cycle of the largest benchmark makes


def organizations(count: int) -> list[Organization]:
    # A cycle limit on every organization, so devin_acu_cycle_limit is published for every org set.
    return [Organization(f"org-{i}", f"Organization {i}", 50_000 + i, 500) for i in range(count)]


async def serve(args: argparse.Namespace) -> None:
    app = create_app(api_key=args.api_key, v3_token=args.v3_token, faults=Faults(latency=args.latency),
                     organizations=organizations(args.organizations), page_size=PAGE_SIZE)
    app[REQUESTS_KEY] = collections.deque(maxlen=RECORDED)
    await serve_until_signalled(app, "simulator")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--organizations", type=int, default=6)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--v3-token", required=True)
    asyncio.run(serve(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
