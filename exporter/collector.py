"""The app's own registry: every family built at scrape time from the snapshot's points, health and API counters."""

from __future__ import annotations

import bisect
import logging
import math
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.catalogue import CATALOGUE, COLLECTORS, all_families
from exporter.catalogue.declare import Derived, Family, Point
from exporter.config import IDENTIFIER_RE, Config, OrgSet
from exporter.plan import ScheduleKey, plan_of
from exporter.selfmetrics import SELF
from exporter.snapshot import ENTERPRISE, Snapshot
from exporter.transport import Attempt, ErrorReason

log = logging.getLogger(__name__)

LATENCY_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Names an undocumented v2 field may not take: every declared family and the health ones.
_RESERVED_NAMES: Final = frozenset(f.name for f in all_families()) | frozenset(SELF)


def _seconds(value: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size and value % size == 0:
            return f"{int(value // size)}{unit}"
    return f"{value:g}s"


def family_help(config: Config, collector: str, family: Family) -> str:
    """The HELP text of a collector's family: its declared text and how often it is refreshed."""
    interval = _seconds(config.collector(collector).interval)
    return (f"{family.help}; refreshed by a background poller every {interval} by default (per-window "
            "intervals may differ), not at scrape time")


def extra_family(name: str) -> Family | None:
    """The family of a numeric field the v2 usage API added beyond the documented five (a point of an
    undeclared `devin_usage_<field>`); None when the name is not one to publish."""
    field_name = name.removeprefix("devin_usage_")
    if not IDENTIFIER_RE.fullmatch(field_name) or name in _RESERVED_NAMES:
        return None
    return Family(name, f"Undocumented usage API field {field_name} in the trailing window")


def series_labels(org_set: OrgSet | None, key: ScheduleKey,
                  points: Iterable[Point]) -> Iterator[tuple[Point, dict[str, str]]]:
    """Each point of a schedule's result with the labels of its series: the org set's `org`, the
    window, the point's own labels, then the set's static labels (none for enterprise collectors)."""
    if org_set is None:
        for point in points:
            yield point, dict(point.labels)
        return
    scope = {"org": org_set.name, **({"window": key.window.name} if key.window is not None else {})}
    for point in points:
        yield point, {**scope, **dict(point.labels), **dict(org_set.labels)}


@dataclass
class _Counts:
    """One (owner, collector)'s requests, errors and latencies."""

    codes: dict[str, int] = field(default_factory=dict)
    # Every reason from 0, so rate() and increase() see a collector's very first error.
    reasons: dict[str, int] = field(default_factory=lambda: dict.fromkeys(map(str, ErrorReason), 0))
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    duration_sum: float = 0.0


@dataclass
class _OrgApiStats:
    by_collector: dict[str, _Counts] = field(default_factory=dict)
    version: int = 0  # bumped on every change, so a rendered exposition knows when it is out of date


class ApiStats:
    """Cumulative request, error and latency counts per owner (org set, or ENTERPRISE) and collector,
    fed by the transport's observer."""

    def __init__(self) -> None:
        self._orgs: dict[str, _OrgApiStats] = {}
        self.version = 0  # bumped on every change to any owner's counts or to the set of owners

    def observe(self, attempt: Attempt) -> None:
        stats = self._orgs.get(attempt.org_set or ENTERPRISE)
        if stats is None:
            return  # a reply for an org set a reload removed while it was in flight
        counts = stats.by_collector.get(attempt.collector)
        if counts is None:
            counts = stats.by_collector[attempt.collector] = _Counts()
        if attempt.status is not None:
            code = str(attempt.status)
            counts.codes[code] = counts.codes.get(code, 0) + 1
        if attempt.reason is not None:
            counts.reasons[str(attempt.reason)] = counts.reasons.get(str(attempt.reason), 0) + 1
        counts.buckets[bisect.bisect_left(LATENCY_BUCKETS, attempt.duration)] += 1
        counts.duration_sum += attempt.duration
        stats.version += 1
        self.version += 1

    def track(self, owners: Iterable[str], collectors: Callable[[str], Iterable[str]] | None = None) -> None:
        """Count for exactly these owners: new ones start at 0, removed ones' series disappear.

        `collectors(owner)` names the collectors whose counters start at 0 for the owner (default:
        usage for org sets); others appear with their first request."""
        # Kept in name order here, once per reload, rather than sorted on every render.
        new: dict[str, _OrgApiStats] = {}
        for name in sorted(set(owners)):
            stats = self._orgs.get(name) or _OrgApiStats()
            for collector in (collectors(name) if collectors else (() if name == ENTERPRISE else ("usage",))):
                if collector not in stats.by_collector:
                    stats.by_collector[collector] = _Counts()
                    stats.version += 1
            new[name] = stats
        self._orgs = new
        self.version += 1

    def items(self) -> Iterator[tuple[str, _OrgApiStats]]:
        return iter(self._orgs.items())

    def attempts(self) -> tuple[int, float]:
        """(attempts, their total seconds) over every owner and collector (for the benchmarks)."""
        counts = [c for stats in self._orgs.values() for c in stats.by_collector.values()]
        return sum(sum(c.buckets) for c in counts), sum(c.duration_sum for c in counts)


@dataclass
class ReloadStatus:
    successful: bool = True
    last_success: float = field(default_factory=time.time)


def _metric(name: str, extra_help: str = "") -> Metric:
    family = SELF[name]
    return Metric(name, family.help + extra_help, family.type)


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
        owners = plan_of(snap.config).owners
        yield from self.data_families(snap, owners, self._clock())[0]
        yield from self.health_families(snap, owners)
        yield from self.api_families(self._stats.items())
        yield from self.exporter_families(snap)

    # Each group below is built for any subset of owners (org sets, and ENTERPRISE for the
    # enterprise-level collectors), so the cached exposition (exposition.py) can render one owner
    # at a time and merge the results by family.

    def data_families(self, snap: Snapshot, owners: Iterable[str], now: float) -> tuple[list[Metric], float]:
        """The families of the collectors' points with samples, and the time after which one of them goes stale."""
        config = snap.config
        plan = plan_of(config)
        sets = _sets_by_name(config.org_sets)
        horizon = math.inf
        families: dict[str, Metric] = {}
        for collector in CATALOGUE:
            for declared in (*collector.families, *(d.family for d in collector.derived)):
                families[declared.name] = Metric(declared.name, family_help(config, collector.name, declared), "gauge")
        for owner in owners:
            results = snap.of(owner)
            org_set = sets.get(owner)
            # Another shard than 0 publishes no enterprise series, only the per-set ones derived from them.
            enterprise_series = owner != ENTERPRISE or plan.publish_enterprise
            for key in plan.of(owner):
                result = results.get(key.slot)
                if result is None or result.points is None or result.last_success is None:
                    continue
                # One expression for the test and the horizon, so a cached rendering expires exactly
                # when this would first drop the series.
                stale_at = result.last_success + config.poll.stale_after * key.interval
                if now > stale_at:
                    continue  # stale: the health series stay so alerts can fire
                horizon = min(horizon, stale_at)
                for point, labels in series_labels(org_set, key, result.points if enterprise_series else ()):
                    family = families.get(point.family) or self._extra_family(point.family, families)
                    if family is not None:
                        family.add_sample(family.name, labels, point.value)
                if owner == ENTERPRISE:
                    self._derived(COLLECTORS[key.collector].derived, result.points, config.org_sets, families)
        return [f for f in families.values() if f.samples], horizon

    @staticmethod
    def _derived(derived: Sequence[Derived], points: Sequence[Point], org_sets: Sequence[OrgSet],
                 families: dict[str, Metric]) -> None:
        """Per-org-set families computed from an enterprise collector's points (an org set's ACU limit)."""
        for item in derived:
            family = families[item.family.name]
            value_of = item.of(points)
            for org_set in org_sets:
                value = value_of(org_set)
                if value is not None:
                    family.add_sample(family.name, {"org": org_set.name, **dict(org_set.labels)}, value)

    def _extra_family(self, name: str, families: dict[str, Metric]) -> Metric | None:
        """A family for a numeric field the v2 usage API added beyond the documented five."""
        declared = extra_family(name)
        if declared is None:
            return None
        field_name = name.removeprefix("devin_usage_")
        if field_name not in self._announced_extras:
            self._announced_extras.add(field_name)
            log.info("exporting an undocumented numeric field of the usage API",
                     extra={"field": field_name, "metric": name})
        family = Metric(name, declared.help, "gauge")
        families[name] = family
        return family

    def health_families(self, snap: Snapshot, owners: Iterable[str]) -> list[Metric]:
        plan = plan_of(snap.config)
        up = _metric("devin_up")
        last = _metric("devin_usage_last_success_timestamp_seconds")
        interval = _metric("devin_exporter_poll_interval_seconds")
        collector_up = _metric("devin_collector_up")
        collector_last = _metric("devin_collector_last_success_timestamp_seconds")
        for owner in owners:
            if owner == ENTERPRISE and not plan.publish_enterprise:
                continue
            org = {"org": owner} if owner != ENTERPRISE else {}
            if owner != ENTERPRISE:
                up.add_sample(up.name, org, 1.0 if plan.up(snap, owner) else 0.0)
            results = snap.of(owner)
            states: dict[str, bool] = {}
            for key in plan.of(owner):
                result = results.get(key.slot)
                ok = result is not None and result.ok
                states[key.collector] = states.get(key.collector, True) and ok
                where = {"collector": key.collector, **org,
                         **({"window": key.window.name} if key.window is not None else {})}
                interval.add_sample(interval.name, where, key.interval)
                ts = result.last_success if result is not None else None
                if ts is not None:
                    collector_last.add_sample(collector_last.name, where, ts)
                    if key.collector == "usage":
                        last.add_sample(last.name, {**org, "window": where["window"]}, ts)
            for name, ok in states.items():
                collector_up.add_sample(collector_up.name, {"collector": name, **org}, 1.0 if ok else 0.0)
        return [up, last, interval, collector_up, collector_last]

    def api_families(self, owners: Iterable[tuple[str, _OrgApiStats]]) -> list[Metric]:
        requests = _metric("devin_exporter_api_requests_total")
        errors = _metric("devin_exporter_api_errors_total")
        latency = _metric("devin_exporter_api_request_duration_seconds")
        requests.name = requests.name.removesuffix("_total")
        errors.name = errors.name.removesuffix("_total")
        for owner, stats in owners:
            org = {"org": owner} if owner != ENTERPRISE else {}
            for collector, counts in sorted(stats.by_collector.items()):
                where = {"collector": collector, **org}
                for code, count in sorted(counts.codes.items()):
                    requests.add_sample("devin_exporter_api_requests_total", {**where, "code": code}, count)
                for reason, count in sorted(counts.reasons.items()):
                    errors.add_sample("devin_exporter_api_errors_total", {**where, "reason": reason}, count)
                cumulative = 0
                for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts.buckets, strict=False):
                    cumulative += count
                    le = "+Inf" if bound == float("inf") else repr(bound)
                    latency.add_sample(latency.name + "_bucket", {**where, "le": le}, cumulative)
                latency.add_sample(latency.name + "_count", where, cumulative)
                latency.add_sample(latency.name + "_sum", where, counts.duration_sum)
        return [requests, errors, latency]

    def exporter_families(self, snap: Snapshot | None = None) -> list[Metric]:
        snap = snap or self._snapshot()
        info = _metric("devin_exporter_build_info")
        info.add_sample(info.name, {"version": __version__, "python_version": platform.python_version()}, 1.0)
        api = _metric("devin_exporter_api_info")
        api.add_sample(api.name, {"version": snap.config.api.version}, 1.0)
        ok = _metric("devin_exporter_config_last_reload_successful")
        ok.add_sample(ok.name, {}, 1.0 if self._reload.successful else 0.0)
        ts = _metric("devin_exporter_config_last_reload_success_timestamp_seconds")
        ts.add_sample(ts.name, {}, self._reload.last_success)
        return [info, api, ok, ts]


def _sets_by_name(org_sets: Sequence[OrgSet]) -> dict[str, OrgSet]:
    return {s.name: s for s in org_sets}


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


__all__ = ["LATENCY_BUCKETS", "ApiStats", "ExporterCollector", "Family", "ReloadStatus", "build_registry",
           "register_runtime_collectors"]
