"""Schedules one poll loop per (org set, window) and publishes each outcome into a new snapshot."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from exporter.client import ApiError, UsageClient, UsageQuery
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


class Poller:
    """Owns the poll tasks and the current snapshot; `/metrics` only ever reads `snapshot`."""

    def __init__(self, client: UsageClient, config: Config, clocks: Clocks | None = None) -> None:
        clocks = clocks or Clocks()
        self._client = client
        self._clock = clocks.wall
        self._monotonic = clocks.monotonic
        self._sleep = clocks.sleep
        self._random = clocks.random
        self.snapshot = Snapshot.empty(config)
        self._tasks: dict[ScheduleKey, asyncio.Task[None]] = {}
        self._started = False

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._started = True
        self._sync_tasks()

    async def stop(self) -> None:
        """Cancel every schedule, in-flight requests included, and wait for them to finish."""
        self._started = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def alive(self) -> bool:
        """True while every schedule's loop is running (for /healthz)."""
        return self._started and all(not t.done() for t in self._tasks.values())

    def apply_config(self, config: Config) -> None:
        """Switch to a new config: unchanged schedules keep their timing and values."""
        old = {ScheduleKey.of(s, w, self.snapshot.config.poll) for s, w in self.snapshot.schedules()}
        new = {ScheduleKey.of(s, w, config.poll).query_identity() for s in config.org_sets for w in s.windows}
        # Values survive when the same question is asked of the API; a schedule whose interval
        # changed gets a new task (new timing) but keeps its last values and devin_up.
        kept = {(k.org_set, k.window.name) for k in old if k.query_identity() in new}
        self._client.update_settings(config.api)
        self.snapshot = self.snapshot.with_config(config, kept)
        if self._started:
            self._sync_tasks()

    def _sync_tasks(self) -> None:
        poll = self.snapshot.config.poll
        wanted = {ScheduleKey.of(s, w, poll): (s, w) for s, w in self.snapshot.schedules()}
        for key in [k for k in self._tasks if k not in wanted]:
            self._tasks.pop(key).cancel()
        for key, (org_set, window) in wanted.items():
            if key not in self._tasks:
                # Spread first polls over the jitter span so a restart does not burst the API.
                first = self._random() * poll.jitter * window.interval
                self._tasks[key] = asyncio.create_task(
                    self._run(key, first), name=f"poll {org_set.name}/{window.name}")

    # --- polling -------------------------------------------------------------------------------

    async def _run(self, key: ScheduleKey, first_delay: float) -> None:
        due = self._monotonic() + first_delay
        while True:
            await self._sleep(max(0.0, due - self._monotonic()))
            await self.poll(key)
            jitter = self.snapshot.config.poll.jitter
            due += key.window.interval * (1 + jitter * (2 * self._random() - 1))
            # A poll that overran its interval (Retry-After, retries) must not cause a burst of catch-up polls.
            due = max(due, self._monotonic())

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
