"""Schedules the polls of every (org set, window) and publishes each outcome into a new snapshot."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from exporter.transport import ApiError, UsageClient, UsageQuery
from exporter.clocks import Clocks
from exporter.config import Config, OrgSet, PollSettings, Window
from exporter.snapshot import Snapshot, WindowResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduleKey:
    """Everything that decides what a schedule asks the API; a reload keeps a schedule iff this is equal."""

    org_set: str
    org_ids: tuple[str, ...]
    user_ids: tuple[str, ...]
    window: Window
    delay: float
    timezone: str

    def query_identity(self) -> tuple[object, ...]:
        """What the API is asked, without the interval (which only decides when it is asked)."""
        w = self.window
        return (self.org_set, self.org_ids, self.user_ids, w.name, w.kind, w.range_seconds, self.delay,
                self.timezone)

    @classmethod
    def of(cls, org_set: OrgSet, window: Window, poll: PollSettings) -> ScheduleKey:
        # Only calendar windows depend on the zone; a zone change must not re-poll the others.
        zone = poll.timezone if window.kind in ("today", "month_to_date") else "UTC"
        return cls(org_set.name, org_set.org_ids, org_set.user_ids, window, poll.delay, zone)


# Polls running at once, per unit of api.max_concurrency: the client bounds the requests in flight;
# this bounds the polls waiting for one (or sleeping between retries), so that 4,000 schedules due
# together (a start with jitter 0) do not become 4,000 tasks at once.
POLLS_PER_REQUEST_SLOT = 4


@dataclass(eq=False)
class Schedule:
    """One (org set, window): when its next poll is due, and that poll while it runs."""

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

    def __init__(self, client: UsageClient, config: Config, clocks: Clocks | None = None) -> None:
        clocks = clocks or Clocks()
        self._client = client
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

    def apply_config(self, config: Config) -> None:
        """Switch to a new config: unchanged schedules keep their timing and values."""
        old = {ScheduleKey.of(s, w, self.snapshot.config.poll) for s, w in self.snapshot.schedules()}
        new = {ScheduleKey.of(s, w, config.poll).query_identity() for s in config.org_sets for w in s.windows}
        # Values survive when the same question is asked of the API; a schedule whose interval
        # changed gets a new schedule (new timing) but keeps its last values and devin_up.
        kept = {(k.org_set, k.window.name) for k in old if k.query_identity() in new}
        self._client.update_settings(config.api)
        self.snapshot = self.snapshot.with_config(config, kept)
        if self._runner is not None:
            self._sync_schedules()

    def _sync_schedules(self) -> None:
        poll = self.snapshot.config.poll
        wanted = {ScheduleKey.of(s, w, poll): w for s, w in self.snapshot.schedules()}
        for key in [k for k in self._schedules if k not in wanted]:
            schedule = self._schedules.pop(key)
            schedule.removed = True
            if schedule.poll is not None:
                schedule.poll.cancel()
        now = self._monotonic()
        for key, window in wanted.items():
            if key not in self._schedules:
                # Spread first polls over the jitter span so a restart does not burst the API.
                schedule = Schedule(key, now + self._random() * poll.jitter * window.interval)
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
                                   name=f"poll {key.org_set}/{key.window.name}")
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
            due = schedule.due + schedule.key.window.interval * (1 + jitter * (2 * self._random() - 1))
            # A poll that overran its interval (Retry-After, retries) must not cause a burst of catch-up polls.
            schedule.due = max(due, self._monotonic())
            self._timers.push(schedule)
            if schedule.due < self._wake_at:  # only then does the scheduler need to look again
                self._changed.set()

    # --- polling -------------------------------------------------------------------------------

    async def poll(self, key: ScheduleKey) -> bool:
        """Poll one window of one org set now and publish the outcome; True on success."""
        window = key.window
        now = datetime.fromtimestamp(self._clock(), tz=UTC)
        start, end = window.bounds(now, key.delay, ZoneInfo(key.timezone))
        query = UsageQuery(key.org_set, start, end, key.org_ids, key.user_ids)
        previous = self.snapshot.result(key.org_set, window.name)
        context = {"org_set": key.org_set, "window": window.name}
        try:
            values = await self._client.fetch(query)
        except ApiError as exc:
            result = previous.failed(str(exc.reason), self._clock())
            if previous.error != result.error and not self._set_failing_with(key, result.error):
                # One line per org set and change of reason, not per poll or window: a revoked key
                # must not flood the log.
                log.warning("poll failed: %s", exc.message,
                            extra={**context, "reason": str(exc.reason), "status": exc.status})
            else:
                log.debug("poll failed again", extra={**context, "reason": str(exc.reason)})
            self._publish(key.org_set, window.name, result)
            return False
        except Exception as exc:
            log.error("poll failed with an internal error: %s: %s", type(exc).__name__, exc, extra=context)
            self._publish(key.org_set, window.name, previous.failed("internal", self._clock()))
            return False
        if previous.error is not None and not self._set_failing_with(key, previous.error):
            log.info("poll recovered", extra={**context, "after": previous.error})
        log.debug("poll succeeded", extra=context)
        self._publish(key.org_set, window.name, previous.succeeded(values, self._clock()))
        return True

    def _set_failing_with(self, key: ScheduleKey, reason: str | None) -> bool:
        """Another window of the key's org set is already failing for `reason`."""
        windows = self.snapshot.results.get(key.org_set, {})
        return any(r.error == reason for name, r in windows.items() if name != key.window.name)

    def _publish(self, org_set: str, window: str, result: WindowResult) -> None:
        self.snapshot = self.snapshot.with_result(org_set, window, result)

    async def poll_all_once(self) -> bool:
        """Poll every schedule once, concurrently (the client bounds it); True if all succeeded."""
        poll = self.snapshot.config.poll
        results = await asyncio.gather(
            *(self.poll(ScheduleKey.of(s, w, poll)) for s, w in self.snapshot.schedules()))
        return all(results)
