"""One poll of one schedule: the requests its collector's endpoints make, and the points they give."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from exporter.catalogue.declare import AnyEndpoint, Collector, Filtered, Point, Query, Version, sum_points
from exporter.paging import fetch_all
from exporter.transport import ApiError, Transport


async def fetch_points(transport: Transport, collector: Collector, version: Version, org_set: str | None,
                       filters: Filtered | None, query: Query) -> tuple[Point, ...]:
    """Every point the collector's calls give for the set; ApiError if any call finally failed.

    The calls (v3 usage: sessions, PRs, searches) go out together; the transport bounds how many
    are in flight. A failure of one fails the poll: a schedule publishes all its families or none.
    """
    plan = collector.plan(version, filters)
    results = await asyncio.gather(*(call_endpoint(transport, collector, e, org_set, query) for e in plan),
                                   return_exceptions=True)
    points: list[Point] = []
    failure: BaseException | None = None
    for result in results:
        if isinstance(result, BaseException):
            # An ApiError says what the API did; anything else is a bug and goes first.
            if failure is None or (isinstance(failure, ApiError) and not isinstance(result, ApiError)):
                failure = result
        else:
            points += result
    if failure is not None:
        raise failure
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

    if len(requests) == 1:
        return await one(0)
    parts = await asyncio.gather(*(one(i) for i in range(len(requests))))
    return sum_points(p for part in parts for p in part)
