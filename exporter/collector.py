"""The app's own registry: usage and health families built at scrape time from the snapshot and API counters."""

from __future__ import annotations

import bisect
import logging
import math
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.transport import Attempt, ErrorReason
from exporter.config import IDENTIFIER_RE, OrgSet
from exporter.snapshot import Snapshot

log = logging.getLogger(__name__)

# API field -> metric suffix, in the order of SPEC §5.
USAGE_FIELDS: Final = {
    "sessions_count": ("sessions", "Devin sessions"),
    "searches_count": ("searches", "Devin searches"),
    "prs_opened": ("prs_opened", "pull requests opened by Devin"),
    "prs_closed": ("prs_closed", "pull requests opened by Devin that were closed"),
    "prs_merged": ("prs_merged", "pull requests opened by Devin that were merged"),
}
_RESERVED_SUFFIXES: Final = {suffix for suffix, _ in USAGE_FIELDS.values()} | {
    "last_success_timestamp_seconds"}
LATENCY_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _seconds(value: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size and value % size == 0:
            return f"{int(value // size)}{unit}"
    return f"{value:g}s"


@dataclass
class _OrgApiStats:
    codes: dict[str, int] = field(default_factory=dict)
    # Every reason from 0, so rate() and increase() see an org set's very first error.
    reasons: dict[str, int] = field(default_factory=lambda: dict.fromkeys(map(str, ErrorReason), 0))
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    duration_sum: float = 0.0
    version: int = 0  # bumped on every change, so a rendered exposition knows when it is out of date


class ApiStats:
    """Cumulative per-org request, error and latency counts, fed by the client's observer."""

    def __init__(self) -> None:
        self._orgs: dict[str, _OrgApiStats] = {}
        self.version = 0  # bumped on every change to any org set's counts or to the set of org sets

    def observe(self, attempt: Attempt) -> None:
        stats = self._orgs.get(attempt.org_set)
        if stats is None:
            return  # a reply for an org set a reload removed while it was in flight
        if attempt.status is not None:
            code = str(attempt.status)
            stats.codes[code] = stats.codes.get(code, 0) + 1
        if attempt.reason is not None:
            stats.reasons[str(attempt.reason)] = stats.reasons.get(str(attempt.reason), 0) + 1
        stats.buckets[bisect.bisect_left(LATENCY_BUCKETS, attempt.duration)] += 1
        stats.duration_sum += attempt.duration
        stats.version += 1
        self.version += 1

    def track(self, org_sets: Iterable[str]) -> None:
        """Count for exactly these org sets: new ones start at 0, removed ones' series disappear."""
        # Kept in name order here, once per reload, rather than sorted on every render.
        self._orgs = {name: self._orgs.get(name) or _OrgApiStats() for name in sorted(set(org_sets))}
        self.version += 1

    def items(self) -> Iterator[tuple[str, _OrgApiStats]]:
        return iter(self._orgs.items())


@dataclass
class ReloadStatus:
    successful: bool = True
    last_success: float = field(default_factory=time.time)


class ExporterCollector(Collector):
    """Builds every exporter family from the latest snapshot; holds no series of its own."""

    def __init__(self, snapshot: Callable[[], Snapshot], stats: ApiStats, reload: ReloadStatus,
                 clock: Callable[[], float] = time.time) -> None:
        self._snapshot = snapshot
        self._stats = stats
        self._reload = reload
        self._clock = clock
        self._announced_extras: set[str] = set()

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from self.usage_families(snap, snap.config.org_sets, self._clock())[0]
        yield from self.health_families(snap, snap.config.org_sets)
        yield from self.api_families(self._stats.items())
        yield from self.exporter_families()

    # Each group below is built for any subset of org sets, so the cached exposition
    # (exposition.py) can render one org set at a time and merge the results by family.

    def usage_families(self, snap: Snapshot, org_sets: Iterable[OrgSet],
                       now: float) -> tuple[list[Metric], float]:
        """The usage families with samples, and the time after which one of them goes stale."""
        config = snap.config
        horizon = math.inf
        help_tail = (f"; refreshed by a background poller every {_seconds(config.poll.interval)} "
                     "by default (per-window intervals may differ), not at scrape time")
        families: dict[str, Metric] = {}
        for api_field, (suffix, what) in USAGE_FIELDS.items():
            families[api_field] = Metric(f"devin_usage_{suffix}",
                                         f"Count of {what} in the trailing window, as returned by the "
                                         f"Devin usage API{help_tail}", "gauge")
        for org_set, window in ((s, w) for s in org_sets for w in s.windows):
            result = snap.result(org_set.name, window.name)
            if result.values is None or result.last_success is None:
                continue
            # One expression for the test and the horizon, so a cached rendering expires exactly
            # when this would first drop the series.
            stale_at = result.last_success + config.poll.stale_after * window.interval
            if now > stale_at:
                continue  # stale: the health series stay so alerts can fire
            horizon = min(horizon, stale_at)
            labels = {"org": org_set.name, "window": window.name, **dict(org_set.labels)}
            for api_field, value in result.values.items():
                family = families.get(api_field) or self._extra_family(api_field, families, help_tail)
                if family is not None:
                    family.add_sample(family.name, labels, value)
        return [f for f in families.values() if f.samples], horizon

    def _extra_family(self, api_field: str, families: dict[str, Metric], help_tail: str) -> Metric | None:
        """A family for a numeric field the API added beyond the documented five."""
        if not IDENTIFIER_RE.fullmatch(api_field) or api_field in _RESERVED_SUFFIXES:
            return None
        if api_field not in self._announced_extras:
            self._announced_extras.add(api_field)
            log.info("exporting an undocumented numeric field of the usage API",
                     extra={"field": api_field, "metric": f"devin_usage_{api_field}"})
        family = Metric(f"devin_usage_{api_field}",
                        f"Undocumented usage API field {api_field} in the trailing window{help_tail}",
                        "gauge")
        families[api_field] = family
        return family

    def health_families(self, snap: Snapshot, org_sets: Iterable[OrgSet]) -> list[Metric]:
        up = Metric("devin_up", "1 if the latest poll of every window of the org set succeeded, else 0",
                    "gauge")
        last = Metric("devin_usage_last_success_timestamp_seconds",
                      "Unix time of the last successful poll of the org set and window", "gauge")
        # Lets alert rules judge staleness relative to each window's own interval.
        interval = Metric("devin_exporter_poll_interval_seconds",
                          "Configured poll interval of the org set and window", "gauge")
        for org_set in org_sets:
            up.add_sample("devin_up", {"org": org_set.name}, 1.0 if snap.up(org_set) else 0.0)
            for window in org_set.windows:
                interval.add_sample(interval.name, {"org": org_set.name, "window": window.name},
                                    window.interval)
                ts = snap.result(org_set.name, window.name).last_success
                if ts is not None:
                    last.add_sample(last.name, {"org": org_set.name, "window": window.name}, ts)
        return [up, last, interval]

    def api_families(self, orgs: Iterable[tuple[str, _OrgApiStats]]) -> list[Metric]:
        requests = Metric("devin_exporter_api_requests", "HTTP responses received from the Devin API, "
                          "by status code", "counter")
        errors = Metric("devin_exporter_api_errors", "Failed Devin API attempts, by reason", "counter")
        latency = Metric("devin_exporter_api_request_duration_seconds",
                         "Latency of each Devin API attempt", "histogram")
        for org, stats in orgs:
            for code, count in sorted(stats.codes.items()):
                requests.add_sample("devin_exporter_api_requests_total", {"org": org, "code": code}, count)
            for reason, count in sorted(stats.reasons.items()):
                errors.add_sample("devin_exporter_api_errors_total", {"org": org, "reason": reason}, count)
            cumulative = 0
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), stats.buckets, strict=False):
                cumulative += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                latency.add_sample(latency.name + "_bucket", {"org": org, "le": le}, cumulative)
            latency.add_sample(latency.name + "_count", {"org": org}, cumulative)
            latency.add_sample(latency.name + "_sum", {"org": org}, stats.duration_sum)
        return [requests, errors, latency]

    def exporter_families(self) -> list[Metric]:
        info = Metric("devin_exporter_build_info", "Build information; constant 1", "gauge")
        info.add_sample(info.name, {"version": __version__,
                                    "python_version": platform.python_version()}, 1.0)
        ok = Metric("devin_exporter_config_last_reload_successful",
                    "1 if the last config load or reload succeeded, else 0", "gauge")
        ok.add_sample(ok.name, {}, 1.0 if self._reload.successful else 0.0)
        ts = Metric("devin_exporter_config_last_reload_success_timestamp_seconds",
                    "Unix time of the last successful config load or reload", "gauge")
        ts.add_sample(ts.name, {}, self._reload.last_success)
        return [info, ok, ts]


def build_registry(collector: ExporterCollector) -> CollectorRegistry:
    """The app's own registry (never the global one): exporter families plus process/python."""
    # support_collectors_without_names: our collectors have no describe() (their families depend
    # on the snapshot), and without it `/metrics?name[]=devin_up` (the handler's name filter)
    # silently returned an empty body, because the restricted registry only consulted collectors
    # it knew by name.
    registry = CollectorRegistry(auto_describe=False, support_collectors_without_names=True)
    registry.register(collector)
    register_runtime_collectors(registry)
    return registry


def register_runtime_collectors(registry: CollectorRegistry) -> None:
    """The standard process_* and python_* families (the cached exposition renders them per scrape)."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)



