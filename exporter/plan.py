"""Which schedules a config asks for: every enabled collector x org set it can answer for x window."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from exporter.catalogue import CATALOGUE, COLLECTORS
from exporter.catalogue.declare import FILTERS, Collector, Version
from exporter.config import Config, OrgSet, Window
from exporter.snapshot import ENTERPRISE, Slot, Snapshot


@dataclass(frozen=True)
class ScheduleKey:
    """Everything that decides what a schedule asks the API; a reload keeps a schedule iff this is equal."""

    collector: str
    org_set: str  # ENTERPRISE for the enterprise-level collectors
    org_ids: tuple[str, ...]
    user_ids: tuple[str, ...]
    window: Window | None  # None for collectors without windows
    interval: float
    delay: float
    timezone: str
    version: Version
    options: tuple[tuple[str, str], ...] = ()

    @property
    def slot(self) -> Slot:
        return self.collector, self.window.name if self.window is not None else None

    def __hash__(self) -> int:
        # Kept as a dataclass's would be, once: a reload at 1,000 org sets hashes 12,000 keys a few times.
        cached: int | None = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.collector, self.org_set, self.org_ids, self.user_ids, self.window, self.interval,
                           self.delay, self.timezone, self.version, self.options))
            object.__setattr__(self, "_hash", cached)
        return cached

    def query_identity(self) -> tuple[object, ...]:
        """What the API is asked, without the interval (which only decides when it is asked).

        Made once per key, like its hash: a reload builds them in its worker thread (see
        `prepare`), so that comparing the old and new schedules on the event loop only looks up."""
        cached: tuple[object, ...] | None = self.__dict__.get("_identity")
        if cached is None:
            w = self.window
            shape = (w.name, w.kind, w.range_seconds) if w is not None else None
            cached = (self.collector, self.org_set, self.org_ids, self.user_ids, shape, self.delay, self.timezone,
                      self.version, self.options)
            object.__setattr__(self, "_identity", cached)
        return cached


@dataclass(frozen=True)
class Plan:
    """The schedules of one config, by owner (org set name, or ENTERPRISE), and what cannot be published."""

    keys: tuple[ScheduleKey, ...]
    by_owner: Mapping[str, tuple[ScheduleKey, ...]]
    notes: tuple[str, ...] = ()  # "org set X: collector usage does not publish …" lines for start-up
    owners: tuple[str, ...] = field(default=())  # org set names, then ENTERPRISE if it has schedules
    # Enterprise-level series come from one replica only (shard 0), or every replica's would add up.
    publish_enterprise: bool = True
    # Owner -> the collectors whose API counters start at 0 for it (see ApiStats.track); made
    # with the plan, in a reload's worker thread, not on the event loop at the switch.
    counted: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def of(self, owner: str) -> tuple[ScheduleKey, ...]:
        return self.by_owner.get(owner, ())

    def up(self, snap: Snapshot, owner: str) -> bool:
        """`devin_up`: the latest poll of every schedule of the owner succeeded."""
        results = snap.of(owner)
        return all((r := results.get(k.slot)) is not None and r.ok for k in self.of(owner))

    def attempted(self, snap: Snapshot, owner: str) -> bool:
        results = snap.of(owner)
        return any((r := results.get(k.slot)) is not None and r.last_attempt is not None for k in self.of(owner))

    def ready(self, snap: Snapshot) -> bool:
        """Every owner with schedules has had at least one finished poll attempt."""
        return all(self.attempted(snap, owner) for owner in self.owners if self.of(owner))


def _key(collector: Collector, config: Config, owner: str, org_set: OrgSet | None, window: Window | None,
         interval: float) -> ScheduleKey:
    poll = config.poll
    settings = config.collector(collector.name)
    # Only calendar windows depend on the zone; a zone change must not re-poll the others.
    zone = poll.timezone if window is not None and window.kind in ("today", "month_to_date") else "UTC"
    options = tuple((name, str(getattr(settings, name))) for name in collector.options)
    return ScheduleKey(collector.name, owner, org_set.org_ids if org_set else (), org_set.user_ids if org_set else (),
                       window, interval, poll.delay if window is not None else 0.0, zone, config.api.version,
                       options)


def build_plan(config: Config) -> Plan:
    version = config.api.version
    publish = config.shard is None or config.shard.index == 0
    keys: list[ScheduleKey] = []
    notes: list[str] = []
    by_owner: dict[str, list[ScheduleKey]] = {}
    for collector in CATALOGUE:
        settings = config.collector(collector.name)
        if not settings.enabled or version not in collector.calls:
            continue
        if collector.scope == "enterprise":
            # Other replicas than shard 0 poll only the collectors whose results their own sets need
            # (organizations: discovery and the sets' ACU limits), and publish no enterprise series.
            if not publish and not collector.derived:
                continue
            if collector.plan(version, None):
                key = _key(collector, config, ENTERPRISE, None, None, settings.interval)
                keys.append(key)
                by_owner.setdefault(ENTERPRISE, []).append(key)
            continue
        for org_set in config.org_sets:
            missing = collector.unpublished(version, org_set)
            if not collector.plan(version, org_set):
                notes.append(f"org set {org_set.name!r}: collector {collector.name} publishes nothing: the API "
                             f"cannot filter it by {_blocking(collector, version, org_set)}")
                continue
            if missing:
                notes.append(f"org set {org_set.name!r}: collector {collector.name} does not publish "
                             f"{', '.join(missing)}: the API cannot filter them by "
                             f"{_blocking(collector, version, org_set, missing)}")
            windows = settings.windows_for(org_set) if collector.windowed else (None,)
            for window in windows:
                interval = window.interval if window is not None else settings.interval
                key = _key(collector, config, org_set.name, org_set, window, interval)
                keys.append(key)
                by_owner.setdefault(org_set.name, []).append(key)
    owners = (*(s.name for s in config.org_sets), *((ENTERPRISE,) if ENTERPRISE in by_owner else ()))
    return Plan(tuple(keys), {o: tuple(k) for o, k in by_owner.items()}, tuple(notes), owners, publish,
                _counted(owners, by_owner))


def _counted(owners: tuple[str, ...], by_owner: Mapping[str, list[ScheduleKey]]) -> dict[str, tuple[str, ...]]:
    counted = {owner: tuple(dict.fromkeys(k.collector for k in by_owner.get(owner, ()))) for owner in owners}
    # A billing_cycle window may ask the cycles endpoint itself (exporter/cycle.py), counted under
    # the organizations collector's enterprise counters: they must exist when that collector is off.
    if any(k.window is not None and k.window.kind == "billing_cycle" and k.version in
           COLLECTORS[k.collector].cycle_bounds for keys in by_owner.values() for k in keys):
        counted[ENTERPRISE] = tuple(dict.fromkeys((*counted.get(ENTERPRISE, ()), "organizations")))
    return counted


def _blocking(collector: Collector, version: Version, org_set: OrgSet, families: tuple[str, ...] = ()) -> str:
    """The set's filters that keep the API from answering for these families (all of them if none)."""
    used = [f for f in FILTERS if getattr(org_set, f)]
    accepted: set[str] = set()
    for call in collector.calls.get(version, ()):
        if not families or any(set(e.families) & set(families) for e in call):
            for endpoint in call:
                accepted |= endpoint.filters | ({endpoint.per} if endpoint.per else set())
    blocking = [f for f in used if f not in accepted]
    # Each filter taken by some endpoint, but not both by one: the combination is what cannot be asked.
    return " and ".join(blocking) if blocking else " and ".join(used) + " together"


# The plans of the two configs asked for last: the running one, and the one a reload builds in its
# worker thread while scrapes still ask for the running one's.
_cache: list[tuple[Config, Plan]] = []
_CACHED = 2


def prepare(config: Config) -> Plan:
    """The plan of `config` with every key's hash and query identity made: what applying it on the
    event loop would otherwise compute there (~0.1 s at 12,000 schedules). For a worker thread."""
    plan = plan_of(config)
    for key in plan.keys:
        hash(key)
        key.query_identity()
    return plan


def plan_of(config: Config) -> Plan:
    """The plan of `config`, computed once per config object (the poller, the collector and the
    landing page all ask for the same one after every reload)."""
    for cached_config, plan in list(_cache):
        if cached_config is config:
            return plan
    plan = build_plan(config)
    _cache[:] = [*_cache[-(_CACHED - 1):], (config, plan)]
    return plan
