"""The current billing cycle, which `billing_cycle` windows send as their bounds (SPEC §10).

It comes from the organizations collector's latest result when there is one that still holds
the moment asked about, else from one call to the cycles endpoint, shared by every schedule that
needs it. While the organizations collector's poll is in flight (it asks the cycles endpoint too),
schedules wait for its result instead: at start-up both would otherwise ask the same thing within
moments.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from exporter.catalogue.declare import AnyEndpoint, Point, Query, Version, format_unix_rfc3339
from exporter.catalogue.organizations import CYCLE_END, CYCLE_START, ORGANIZATIONS, V2_CYCLES, V3_CYCLES
from exporter.fetch import call_endpoint
from exporter.transport import ApiError, ErrorReason, Transport

_ENDPOINTS: dict[Version, AnyEndpoint] = {"v3": V3_CYCLES, "v2": V2_CYCLES}


class BillingCycle:
    """The cycle holding a moment, as (start, end) in Unix seconds, kept up to date lazily.

    It remembers the last few cycles it learned, newest first: a live poll only ever asks about
    now, but a backfill asks about every step of its range, and each cycle it crosses costs one
    request, not one per step.
    """

    KEPT = 24  # two years of monthly cycles; a long-running exporter learns one a month

    def __init__(self, transport: Transport, clock: Callable[[], float]) -> None:
        self._transport = transport
        self._clock = clock
        self._cycles: list[tuple[float, float]] = []
        self._lock = asyncio.Lock()
        self._listing: asyncio.Event | None = None  # set when the organizations poll in flight ends

    def learn(self, points: Iterable[Point]) -> None:
        """Take the cycle from an organizations result's points."""
        values = {p.family: p.value for p in points if p.family in (CYCLE_START, CYCLE_END)}
        if CYCLE_START in values and CYCLE_END in values:
            cycle = (values[CYCLE_START], values[CYCLE_END])
            # Newest first, so a cycle the API has since redrawn loses to the new one.
            self._cycles = [cycle, *(c for c in self._cycles if c != cycle)][: self.KEPT]

    @contextmanager
    def listing(self) -> Iterator[None]:
        """Around a poll of the organizations collector, whose result `learn`s the cycle: `cycle_at`
        waits for it to end rather than ask the cycles endpoint a second time."""
        done = self._listing = asyncio.Event()
        try:
            yield
        finally:
            done.set()
            if self._listing is done:
                self._listing = None

    def _holding(self, at: float) -> tuple[float, float] | None:
        return next((c for c in self._cycles if c[0] <= at < c[1]), None)

    async def cycle_at(self, version: Version, at: float) -> tuple[float, float] | None:
        """The cycle that holds `at`, asking the cycles endpoint if no known cycle does; None when
        the API lists none that holds it (before the enterprise's first cycle, or ahead of now)."""
        cycle = self._holding(at)
        if cycle is not None:
            return cycle
        if self._listing is not None:
            await self._listing.wait()
            cycle = self._holding(at)
            if cycle is not None:
                return cycle
        async with self._lock:  # one request for every schedule waiting on the same answer
            cycle = self._holding(at)
            if cycle is not None:
                return cycle
            # Counted under the organizations collector, whose endpoint it is.
            points = await call_endpoint(self._transport, ORGANIZATIONS, _ENDPOINTS[version], None,
                                         Query(end=datetime.fromtimestamp(at, tz=UTC)))
            self.learn(points)
            return self._holding(at)

    async def start(self, version: Version, at: float | None = None) -> float:
        """The start of the cycle holding `at` (default: now); ApiError if the API lists none."""
        cycle = await self.cycle_at(version, self._clock() if at is None else at)
        if cycle is None:
            raise ApiError(ErrorReason.INVALID_RESPONSE,
                           "the billing cycles endpoint lists no cycle that holds the current time"
                           if at is None else
                           f"the billing cycles endpoint lists no cycle that holds {format_unix_rfc3339(at)}")
        return cycle[0]
