"""The current billing cycle, which `billing_cycle` windows send as their bounds (SPEC §10).

It comes from the organizations collector's latest result when there is one that still holds
now, else from one call to the cycles endpoint, shared by every schedule that needs it. While
the organizations collector's poll is in flight (it asks the cycles endpoint too), schedules wait
for its result instead: at start-up both would otherwise ask the same thing within moments.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from exporter.catalogue.declare import AnyEndpoint, Point, Query, Version
from exporter.catalogue.organizations import CYCLE_END, CYCLE_START, ORGANIZATIONS, V2_CYCLES, V3_CYCLES
from exporter.fetch import call_endpoint
from exporter.transport import ApiError, ErrorReason, Transport

_ENDPOINTS: dict[Version, AnyEndpoint] = {"v3": V3_CYCLES, "v2": V2_CYCLES}


class BillingCycle:
    """The (start, end) of the current cycle in Unix seconds, kept up to date lazily."""

    def __init__(self, transport: Transport, clock: Callable[[], float]) -> None:
        self._transport = transport
        self._clock = clock
        self._cycle: tuple[float, float] | None = None
        self._lock = asyncio.Lock()
        self._listing: asyncio.Event | None = None  # set when the organizations poll in flight ends

    def learn(self, points: Iterable[Point]) -> None:
        """Take the cycle from an organizations result's points."""
        values = {p.family: p.value for p in points if p.family in (CYCLE_START, CYCLE_END)}
        if CYCLE_START in values and CYCLE_END in values:
            self._cycle = (values[CYCLE_START], values[CYCLE_END])

    @contextmanager
    def listing(self) -> Iterator[None]:
        """Around a poll of the organizations collector, whose result `learn`s the cycle: `start`
        waits for it to end rather than ask the cycles endpoint a second time."""
        done = self._listing = asyncio.Event()
        try:
            yield
        finally:
            done.set()
            if self._listing is done:
                self._listing = None

    def _holding(self, now: float) -> float | None:
        cycle = self._cycle
        return cycle[0] if cycle is not None and cycle[0] <= now < cycle[1] else None

    async def start(self, version: Version) -> float:
        """The current cycle's start; asks the cycles endpoint if no known cycle holds now."""
        now = self._clock()
        start = self._holding(now)
        if start is not None:
            return start
        if self._listing is not None:
            await self._listing.wait()
            start = self._holding(self._clock())
            if start is not None:
                return start
        async with self._lock:  # one request for every schedule waiting on the same answer
            start = self._holding(self._clock())
            if start is not None:
                return start
            # Counted under the organizations collector, whose endpoint it is.
            points = await call_endpoint(self._transport, ORGANIZATIONS, _ENDPOINTS[version], None,
                                         Query(end=datetime.fromtimestamp(now, tz=UTC)))
            self.learn(points)
            start = self._holding(self._clock())
            if start is None:
                raise ApiError(ErrorReason.INVALID_RESPONSE,
                               "the billing cycles endpoint lists no cycle that holds the current time")
            return start
