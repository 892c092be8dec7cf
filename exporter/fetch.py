"""One poll of one schedule: the requests its collector's endpoints make, and the points they give."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from exporter.catalogue.declare import AnyEndpoint, Collector, Filtered, Point, Query, Version, sum_points
from exporter.paging import fetch_all
from exporter.transport import ApiError, Transport

T = TypeVar("T")


async def fetch_points(transport: Transport, collector: Collector, version: Version, org_set: str | None,
                       filters: Filtered | None, query: Query) -> tuple[Point, ...]:
    """Every point the collector's calls give for the set; ApiError if any call finally failed.

    The calls (v3 usage: sessions, PRs, searches) go out together; the transport bounds how many
    are in flight. A failure of one fails the poll: a schedule publishes all its families or none.
    """
    plan = collector.plan(version, filters)
    parts = await _together([call_endpoint(transport, collector, e, org_set, query) for e in plan])
    points = [p for part in parts for p in part]
    collector.check(points)
    return tuple(points)


async def call_endpoint(transport: Transport, collector: Collector, endpoint: AnyEndpoint, org_set: str | None,
                        query: Query) -> Sequence[Point]:
    """The points of one endpoint: all its pages, or the sum over its per-id requests."""
    requests = endpoint.requests(query, org_set=org_set, collector=collector.name, permission=collector.permission)

    async def one(request_index: int) -> list[Point]:
        request = requests[request_index]
        if endpoint.paging is not None:
            items = await fetch_all(transport, request, endpoint.paging, endpoint.read)
        else:
            items = [await transport.get(request, endpoint.read)]
        return list(endpoint.points(items, query))

    parts = await _together([one(i) for i in range(len(requests))])
    return parts[0] if len(parts) == 1 else sum_points(p for part in parts for p in part)


async def _together(calls: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run the calls concurrently and return their results in order, once every one has ended.

    If any failed, raise one of the failures: an ApiError says what the API did, anything else is
    a bug and goes first. A single call runs in the caller's task; more get tasks named after the
    caller ("poll usage/team/7d call 2"), so a task count can tell a poll's parts from a leak.
    """
    if len(calls) == 1:
        return [await calls[0]]
    current = asyncio.current_task()
    parent = current.get_name() if current is not None else "fetch"
    tasks = [asyncio.create_task(call, name=f"{parent} call {i}") for i, call in enumerate(calls)]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        raise next((f for f in failures if not isinstance(f, ApiError)), failures[0])
    return [r for r in results if not isinstance(r, BaseException)]
