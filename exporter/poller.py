"""Schedules the polls of every (collector, org set, window) and publishes each outcome into a new snapshot.

It never names an endpoint: a schedule's collector declares what to ask (exporter/catalogue), and
exporter/fetch.py asks it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from exporter.catalogue import COLLECTORS
from exporter.catalogue.declare import Point, Query
from exporter.clocks import Clocks
from exporter.config import Config, OrgSet, Window
from exporter.cycle import BillingCycle
from exporter.fetch import fetch_points
from exporter.plan import ScheduleKey, plan_of
from exporter.snapshot import ENTERPRISE, Result, Slot, Snapshot
from exporter.transport import ApiError, Transport

log = logging.getLogger(__name__)


# Polls running at once, per unit of api.max_concurrency: the client bounds the requests in flight;
# this bounds the polls waiting for one (or sleeping between retries), so that 4,000 schedules due
# together (a start with jitter 0) do not become 4,000 tasks at once.
POLLS_PER_REQUEST_SLOT = 4


async def query_at(key: ScheduleKey, now: datetime, cycle: BillingCycle) -> Query:
    """The filters and time bounds a poll of the schedule at `now` sends; a billing_cycle window may
    need the cycle holding `now` from the API first (its failure fails the poll). Live polls ask
    at the wall clock's now, a backfill at each of its step ends."""
    window = key.window
    start: datetime | None = None
    end: datetime | None = now
    if window is not None:
        start, end = window.bounds(now, key.delay, ZoneInfo(key.timezone))
        if window.kind == "billing_cycle" and key.version in COLLECTORS[key.collector].cycle_bounds:
            cycle_start = await cycle.start(key.version, now.timestamp())
            end = now - timedelta(seconds=key.delay)
            # For `delay` after a cycle begins none of it is settled yet: ask for an empty
            # window, not one that ends before it starts (which the API rejects with a 422).
            start = min(datetime.fromtimestamp(cycle_start, tz=UTC), end)
    return Query(key.org_ids, key.user_ids, start, end, key.options)


async def points_at(transport: Transport, key: ScheduleKey, now: datetime, cycle: BillingCycle) -> tuple[Point, ...]:
    """Every point a poll of the schedule at `now` gives; ApiError if a call finally failed."""
    query = await query_at(key, now, cycle)
    return await fetch_points(transport, COLLECTORS[key.collector], key.version, key.org_set or None, key, query)


@dataclass(frozen=True, eq=False)
class ScheduleChange:
    """What switching from config `old` to `new` does to the schedules; made by `schedule_change`,
    in a reload's worker thread, so that the event loop does not compare 12,000 keys (~0.2 s)."""

    old: Config
    new: Config
    kept: Mapping[str, frozenset[Slot]]  # org set -> the slots whose results survive: the same question
    removed: tuple[ScheduleKey, ...]  # old schedules the new config does not have
    added: tuple[ScheduleKey, ...]  # new schedules, enterprise-level ones first


def schedule_change(old: Config, new: Config) -> ScheduleChange:
    old_keys, new_keys = plan_of(old).keys, plan_of(new).keys
    # Values survive when the same question is asked of the API; a schedule whose interval
    # changed gets a new schedule (new timing) but keeps its last values and devin_up.
    identities = {k.query_identity() for k in new_keys}
    kept_slots: dict[str, set[Slot]] = {}
    for k in old_keys:
        if k.query_identity() in identities:
            kept_slots.setdefault(k.org_set, set()).add(k.slot)
    kept = {org_set: frozenset(slots) for org_set, slots in kept_slots.items()}
    old_set, new_set = set(old_keys), set(new_keys)
    removed = tuple(k for k in old_keys if k not in new_set)
    # Enterprise-level schedules first (for schedules due together): discovery and the billing
    # cycle other schedules send come from the organizations collector's result.
    added = tuple(sorted((k for k in new_keys if k not in old_set), key=lambda k: k.org_set != ENTERPRISE))
    return ScheduleChange(old, new, kept, removed, added)


@dataclass(eq=False)
class Schedule:
    """One (collector, org set, window): when its next poll is due, and that poll while it runs."""

    key: ScheduleKey
    due: float  # monotonic
    poll: asyncio.Task[None] | None = None
    removed: bool = False  # by a reload; its entry in the timer heap is skipped


@dataclass
class _Timers:
    """The schedules by due time (a heap; a removed schedule's entry stays until popped)."""

    heap: list[tuple[float, int, Schedule]] = field(default_factory=list)
    order: itertools.count[int] = field(default_factory=itertools.count)

    def push(self, schedule: Schedule) -> None:
        heapq.heappush(self.heap, (schedule.due, next(self.order), schedule))

    def next_due(self) -> float:
        while self.heap and self.heap[0][2].removed:
            heapq.heappop(self.heap)
        return self.heap[0][0] if self.heap else math.inf

    def pop(self) -> Schedule:
        return heapq.heappop(self.heap)[2]


class Poller:
    """Owns the schedules and the current snapshot; `/metrics` only ever reads `snapshot`.

    One task runs the timers: it sleeps until the earliest schedule is due and starts its poll,
    with at most POLLS_PER_REQUEST_SLOT times api.max_concurrency polls running; a finished poll
    puts its schedule back at its next due time. (One task per schedule cost ~1.4 KB each, 6 MB
    at 1,000 org sets of 4 windows, and made a start with jitter 0 a burst of all of them.)
    """

    def __init__(self, transport: Transport, config: Config, clocks: Clocks | None = None,
                 on_result: Callable[[ScheduleKey, Result], None] | None = None) -> None:
        clocks = clocks or Clocks()
        self._transport = transport
        self._on_result = on_result  # the one back-edge: discovery and the billing cycle read results
        self._clock = clocks.wall
        self._monotonic = clocks.monotonic
        self._sleep = clocks.sleep
        self._random = clocks.random
        self.snapshot = Snapshot.empty(config)
        self._schedules: dict[ScheduleKey, Schedule] = {}
        self._timers = _Timers()
        self._polls: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()  # wakes the scheduler: see _wake_at and _full
        self._wake_at = math.inf  # when the scheduler's sleep ends; a schedule due earlier wakes it
        self._full = False  # the scheduler waits for a poll slot; a finished poll wakes it
        self._runner: asyncio.Task[None] | None = None
        self.cycle = BillingCycle(transport, clocks.wall)

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._sync_schedules()
        self._runner = asyncio.create_task(self._run_timers(), name="poll scheduler")

    async def stop(self) -> None:
        """Stop scheduling, cancel every poll (in-flight requests included) and wait for them."""
        runner, self._runner = self._runner, None
        tasks = [*self._polls, *([runner] if runner is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._schedules.clear()

    def alive(self) -> bool:
        """True while the scheduler runs (for /healthz)."""
        return self._runner is not None and not self._runner.done()

    def apply_config(self, config: Config, change: ScheduleChange | None = None) -> None:
        """Switch to a new config: unchanged schedules keep their timing and values.

        `change` is `schedule_change(running config, config)` if made beforehand (off the event loop)."""
        if change is None or change.old is not self.snapshot.config or change.new is not config:
            change = schedule_change(self.snapshot.config, config)
        self._transport.update_settings(config.api)
        self.snapshot = self.snapshot.with_config(config, change.kept)
        if self._runner is not None:
            # The running schedules are the old config's (start() made them, each switch keeps them so).
            self._sync_schedules(change.removed, change.added)

    def _sync_schedules(self, removed: tuple[ScheduleKey, ...] | None = None,
                        added: tuple[ScheduleKey, ...] | None = None) -> None:
        """Stop the `removed` schedules and start the `added` ones; without them, make the
        schedules the running config's plan."""
        poll = self.snapshot.config.poll
        if removed is None or added is None:
            wanted = plan_of(self.snapshot.config).keys
            wanted_set = set(wanted)
            removed = tuple(k for k in self._schedules if k not in wanted_set)
            # Enterprise-level schedules first (for schedules due together): discovery and the billing
            # cycle other schedules send come from the organizations collector's result.
            added = tuple(sorted(wanted, key=lambda k: k.org_set != ENTERPRISE))
        for key in removed:
            schedule = self._schedules.pop(key, None)
            if schedule is None:
                continue
            schedule.removed = True
            if schedule.poll is not None:
                schedule.poll.cancel()
        now = self._monotonic()
        for key in added:
            if key not in self._schedules:
                # Spread first polls over the jitter span so a restart does not burst the API.
                schedule = Schedule(key, now + self._random() * poll.jitter * key.interval)
                self._schedules[key] = schedule
                self._timers.push(schedule)
        self._changed.set()

    # --- scheduling ----------------------------------------------------------------------------

    async def _run_timers(self) -> None:
        while True:
            self._changed.clear()
            now = self._monotonic()
            limit = POLLS_PER_REQUEST_SLOT * self.snapshot.config.api.max_concurrency
            while self._timers.next_due() <= now and len(self._polls) < limit:
                self._start_poll(self._timers.pop())
            due = self._timers.next_due()
            self._full = len(self._polls) >= limit
            self._wake_at = now if self._full else due
            if self._full or due == math.inf:
                await self._changed.wait()  # a poll finished, or a reload added schedules
            else:
                await self._sleep_or_change(due - now)

    async def _sleep_or_change(self, delay: float) -> None:
        """The injected sleep, cut short if a schedule becomes due earlier or a poll slot frees."""
        sleeper = asyncio.ensure_future(self._sleep(delay))
        waker = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait((sleeper, waker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                task.cancel()
            # wait(), not gather(): their CancelledError stays theirs. Suppressing it around a
            # gather() also swallowed a stop() that cancelled this task meanwhile, and the
            # scheduler slept on, so the process hung on shutdown.
            await asyncio.wait((sleeper, waker))

    def _start_poll(self, schedule: Schedule) -> None:
        key = schedule.key
        task = asyncio.create_task(self._poll_and_reschedule(schedule),
                                   name=f"poll {key.collector}/{key.org_set}/{key.slot[1]}")
        schedule.poll = task
        self._polls.add(task)

    async def _poll_and_reschedule(self, schedule: Schedule) -> None:
        try:
            await self.poll(schedule.key)
        finally:
            self._polls.discard(asyncio.current_task())
            schedule.poll = None
            if self._full:
                self._changed.set()
        if not schedule.removed:
            jitter = self.snapshot.config.poll.jitter
            due = schedule.due + schedule.key.interval * (1 + jitter * (2 * self._random() - 1))
            # A poll that overran its interval (Retry-After, retries) must not cause a burst of catch-up polls.
            schedule.due = max(due, self._monotonic())
            self._timers.push(schedule)
            if schedule.due < self._wake_at:  # only then does the scheduler need to look again
                self._changed.set()

    # --- polling -------------------------------------------------------------------------------

    def key(self, collector: str, org_set: OrgSet | None, window: Window | None) -> ScheduleKey:
        """The schedule of (collector, org set, window) under the running config (for tests and --once)."""
        owner = org_set.name if org_set is not None else ""
        name = window.name if window is not None else None
        return next(k for k in plan_of(self.snapshot.config).of(owner)
                    if k.collector == collector and k.slot[1] == name)

    async def poll(self, key: ScheduleKey) -> bool:
        """Poll one schedule now and publish the outcome; True on success."""
        if key.collector == "organizations" and key.org_set == ENTERPRISE:
            with self.cycle.listing():  # its result holds the billing cycles: others wait for it
                return await self._poll(key)
        return await self._poll(key)

    async def _poll(self, key: ScheduleKey) -> bool:
        slot = key.slot
        previous = self.snapshot.result(key.org_set, *slot)
        context = {"collector": key.collector, **({"org_set": key.org_set} if key.org_set else {}),
                   **({"window": slot[1]} if slot[1] is not None else {})}
        try:
            points = await points_at(self._transport, key, datetime.fromtimestamp(self._clock(), tz=UTC),
                                     self.cycle)
        except ApiError as exc:
            result = previous.failed(str(exc.reason), self._clock())
            if previous.error != result.error and not self._set_failing_with(key, result.error):
                # One line per org set, collector and change of reason, not per poll or window: a
                # revoked key must not flood the log.
                log.warning("poll failed: %s", exc.message,
                            extra={**context, "reason": str(exc.reason), "status": exc.status})
            else:
                log.debug("poll failed again", extra={**context, "reason": str(exc.reason)})
            self._publish(key, result)
            return False
        except Exception as exc:  # a DeclarationError too: a bug, said loudly
            log.error("poll failed with an internal error: %s: %s", type(exc).__name__, exc, extra=context)
            self._publish(key, previous.failed("internal", self._clock()))
            return False
        if previous.error is not None and not self._set_failing_with(key, previous.error):
            log.info("poll recovered", extra={**context, "after": previous.error})
        log.debug("poll succeeded", extra=context)
        self._publish(key, previous.succeeded(points, self._clock()))
        return True

    def _set_failing_with(self, key: ScheduleKey, reason: str | None) -> bool:
        """Another window of the key's org set and collector is already failing for `reason`."""
        results = self.snapshot.of(key.org_set)
        return any(r.error == reason for slot, r in results.items()
                   if slot[0] == key.collector and slot != key.slot)

    def _publish(self, key: ScheduleKey, result: Result) -> None:
        self.snapshot = self.snapshot.with_result(key.org_set, key.slot, result)
        if self._on_result is not None:
            self._on_result(key, result)

    async def poll_all_once(self) -> bool:
        """Poll every schedule once, concurrently (the transport bounds it); True if all succeeded.

        Enterprise-level schedules go first: discovery and billing cycles come from them."""
        keys = plan_of(self.snapshot.config).keys
        first = [k for k in keys if not k.org_set]
        done = list(await asyncio.gather(*(self.poll(k) for k in first)))
        rest = plan_of(self.snapshot.config).keys  # discovery may have added org sets
        done += await asyncio.gather(*(self.poll(k) for k in rest if k.org_set))
        return all(done)
