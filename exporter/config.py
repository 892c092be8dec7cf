"""Turns the YAML config file into frozen, typed objects: config_schema checks keys and types, the rest is here."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from msgspec import UNSET

# Re-exported (`X as X`): part of this module's interface, declared with the schema or the YAML reader.
from exporter.config_schema import CALENDAR_WINDOWS as CALENDAR_WINDOWS
from exporter.config_schema import DEFAULT_BASE_URL as DEFAULT_BASE_URL
from exporter.config_schema import DEFAULT_CONSUMPTION_WINDOWS as DEFAULT_CONSUMPTION_WINDOWS
from exporter.config_schema import DEFAULT_WINDOWS as DEFAULT_WINDOWS
from exporter.config_schema import (
    DURATION_RE_TEXT,
    LABEL_NAME_RE_TEXT,
    ActiveUsersCollector,
    AnyCollectorSection,
    ApiSection,
    CollectorsSection,
    ConfigFile,
    ConsumptionCollector,
    DiscoverySection,
    OrganizationsCollector,
    OrgSetEntry,
    PollSection,
    QueueCollector,
    ServerSection,
    UsageCollector,
    WindowEntry,
    convert,
)
from exporter.config_schema import RESERVED_LABELS as RESERVED_LABELS
from exporter.config_schema import ApiVersionSetting as ApiVersionSetting
from exporter.config_schema import WindowKind as WindowKind
from exporter.secret import ApiKey
from exporter.shard import Shard, parse_shard
from exporter.yamldoc import ConfigError as ConfigError
from exporter.yamldoc import Node, expand_env
from exporter.yamldoc import parse_yaml as parse_yaml
from exporter.yamldoc import read_text as read_text

if TYPE_CHECKING:  # loaded only with a web config (see _server)
    from exporter.webconfig import WebConfig


API_KEY_ENV: Final = "DEVIN_API_KEY"
MIN_WINDOW_SECONDS: Final = 60.0
# Beyond this, date arithmetic overflows and no real window or timeout is meant.
MAX_DURATION_SECONDS: Final = 100 * 365 * 86400.0

ApiVersion = Literal["v2", "v3"]
V3_TOKEN_PREFIX: Final = "cog_"  # a service user's token
V2_KEY_PREFIXES: Final = ("apk_user_", "apk_")  # an enterprise admin's personal API key, a legacy key

CollectorName = Literal["usage", "active_users", "consumption", "organizations", "queue"]
COLLECTOR_NAMES: Final[tuple[CollectorName, ...]] = ("usage", "active_users", "consumption", "organizations",
                                                      "queue")
V3_ONLY_COLLECTORS: Final[frozenset[CollectorName]] = frozenset({"active_users", "queue"})
WINDOWED_COLLECTORS: Final[frozenset[CollectorName]] = frozenset({"usage", "active_users", "consumption"})


# --- value types -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiSettings:
    """How to reach the Devin API and how hard to press on it."""

    base_url: str
    api_key: ApiKey
    timeout: float = 30.0  # seconds, per request attempt
    max_concurrency: int = 4  # requests in flight at once, all org sets together
    max_requests_per_second: float = 2.0  # across all org sets, and all replicas of a sharded key
    retries: int = 3  # extra attempts after the first, on retryable failures
    api_key_file: str | None = None  # where the key came from, so a reload re-reads it
    version: ApiVersion = "v2"  # resolved from version_setting and the key; parse_config always sets it
    version_setting: ApiVersionSetting = "auto"  # api.version as written
    # Replicas sharing the key (the shard COUNT): the upstream limit is per key, so each replica
    # takes its share of max_requests_per_second, and COUNT replicas together stay within it.
    rate_share: int = 1

    @property
    def requests_per_second(self) -> float:
        """The request rate this process keeps to: its share of max_requests_per_second."""
        return self.max_requests_per_second / self.rate_share


@dataclass(frozen=True)
class Window:
    """A trailing time range ending at poll time, named as the user wrote it."""

    name: str  # the `window` label value: "24h", "today", "billing_cycle", ...
    kind: WindowKind
    range_seconds: float | None  # only for kind == "range"
    interval: float  # seconds between polls of this window
    # The entry gave its own `interval`, which then wins over a collector's. Not compared: a window
    # is the same window whichever way its interval was arrived at.
    interval_explicit: bool = field(default=False, compare=False)

    def bounds(
        self, now: datetime, delay: float, tz: ZoneInfo
    ) -> tuple[datetime | None, datetime | None]:
        """The (start, end) to ask the API for at `now`; (None, None) means the billing cycle."""
        if self.kind == "billing_cycle":
            return None, None
        end = now.astimezone(UTC) - timedelta(seconds=delay)
        if self.kind == "range":
            assert self.range_seconds is not None
            return end - timedelta(seconds=self.range_seconds), end
        local = end.astimezone(tz)
        midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
        if self.kind == "month_to_date":
            midnight = midnight.replace(day=1)
        # Re-localize so a DST change between midnight and now gives midnight's real offset.
        start = datetime(midnight.year, midnight.month, midnight.day, tzinfo=tz)
        return start.astimezone(UTC), end


@dataclass(frozen=True)
class PollSettings:
    interval: float = 300.0
    jitter: float = 0.1
    delay: float = 0.0
    stale_after: int = 3
    timezone: str = "UTC"

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


@dataclass(frozen=True)
class OrgSet:
    """A named filter on the enterprise: the unit the `org` label stands for."""

    name: str
    org_ids: tuple[str, ...] = ()
    user_ids: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()  # static labels, sorted by name
    windows: tuple[Window, ...] = ()  # resolved: the set's own list, else the global one


@dataclass(frozen=True)
class CollectorSettings:
    """One collector of SPEC §10: whether it runs, how often, and over which windows."""

    name: CollectorName
    enabled: bool
    interval: float  # seconds
    windows: tuple[Window, ...] | None = None  # windowed collectors: an explicit list, or None = each org set's
    min_sessions: int = 1  # active_users only
    min_searches: int = 1

    def windows_for(self, org_set: OrgSet) -> tuple[Window, ...]:
        """The windows this collector polls for `org_set`, each with its interval resolved: the window
        entry's own if it gave one, else this collector's. () for a collector that takes no windows."""
        if self.name not in WINDOWED_COLLECTORS:
            return ()
        windows = self.windows if self.windows is not None else org_set.windows
        return tuple(w if w.interval_explicit or w.interval == self.interval else replace(w, interval=self.interval)
                     for w in windows)


@dataclass(frozen=True)
class DiscoverySettings:
    """Organization discovery (SPEC §11): one org set per organization the API lists."""

    organizations: bool = False
    windows: tuple[Window, ...] | None = None  # for discovered sets; None = the top-level windows
    labels: tuple[tuple[str, str], ...] = ()  # static labels on discovered sets, sorted by name
    exclude: tuple[str, ...] = ()  # org ids not to turn into org sets


def default_collectors(poll_interval: float = PollSettings.interval,
                       version: ApiVersion = "v2") -> Mapping[str, CollectorSettings]:
    """Every collector at its defaults: what a config without `collectors` gets on API `version`."""
    written = _collectors(CollectorsSection(), Node(None, "collectors", "<defaults>"), poll_interval)
    return MappingProxyType({name: _for_version(c, version) for name, c in written.items()})


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 9877
    web_config_file: str | None = None
    web_config: WebConfig | None = None  # the parsed file, validated with the rest of the config
    enable_lifecycle: bool = False  # POST /-/reload, as Prometheus' --web.enable-lifecycle

    @property
    def listen(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Config:
    api: ApiSettings
    poll: PollSettings
    windows: tuple[Window, ...]
    org_sets: tuple[OrgSet, ...]
    server: ServerSettings
    source: str = "<config>"
    shard: Shard | None = None  # this replica's share of the org sets; None: it polls all of them
    all_org_sets: tuple[OrgSet, ...] = ()  # with a shard: every org set, before the split
    # Every collector by name, all of COLLECTOR_NAMES; left empty, the defaults for `poll` and `api`.
    collectors: Mapping[str, CollectorSettings] = field(default_factory=dict)
    discovery: DiscoverySettings = DiscoverySettings()
    notes: tuple[str, ...] = ()  # info lines for start-up and --check-config
    # The sets with_org_sets() added after the configured ones (all of them, before a shard's split).
    discovered_org_sets: tuple[OrgSet, ...] = ()

    def __post_init__(self) -> None:
        collectors = dict(self.collectors)
        if unknown := set(collectors) - set(COLLECTOR_NAMES):
            raise ValueError(f"unknown collector(s): {', '.join(sorted(unknown))}")
        if len(collectors) < len(COLLECTOR_NAMES):  # built by hand, not parsed (every replace() comes here)
            collectors = {**default_collectors(self.poll.interval, self.api.version), **collectors}
        # Read-only, so the frozen config cannot be changed through it.
        object.__setattr__(self, "collectors", MappingProxyType({n: collectors[n] for n in COLLECTOR_NAMES}))

    def collector(self, name: str) -> CollectorSettings:
        """The settings of collector `name` (one of COLLECTOR_NAMES); KeyError for another name."""
        try:
            return self.collectors[name]
        except KeyError:
            raise KeyError(f"no collector {name!r}; the collectors are {', '.join(COLLECTOR_NAMES)}") from None

    def with_shard(self, shard: Shard | None) -> Config:
        """The config of replica `shard`: the org sets it owns (every one for None)."""
        return self._with_sets(self._configured_org_sets(), self.discovered_org_sets, shard)

    def with_org_sets(self, extra: tuple[OrgSet, ...]) -> Config:
        """The config with `extra` (discovered sets) after the configured org sets, replacing the extra
        sets of an earlier call; with a shard, only the extra sets it owns. ValueError on a name that
        is taken: two series under one `org` label would mean two things."""
        configured = self._configured_org_sets()
        names = {s.name for s in configured}
        for org_set in extra:
            if org_set.name in names:
                raise ValueError(f"org set name {org_set.name!r} is taken")
            names.add(org_set.name)
        return self._with_sets(configured, tuple(extra), self.shard)

    def discovered_org_set(self, name: str, org_id: str) -> OrgSet:
        """The org set discovery makes of one organization: its id as filter and `org_id` label, plus
        discovery.labels, over discovery.windows (else the top-level windows)."""
        labels = tuple(sorted((*self.discovery.labels, ("org_id", org_id))))
        windows = self.discovery.windows if self.discovery.windows is not None else self.windows
        return OrgSet(name=name, org_ids=(org_id,), labels=labels, windows=windows)

    def _configured_org_sets(self) -> tuple[OrgSet, ...]:
        every = self.all_org_sets if self.shard is not None else self.org_sets
        return every[: len(every) - len(self.discovered_org_sets)]

    def _with_sets(self, configured: tuple[OrgSet, ...], discovered: tuple[OrgSet, ...],
                   shard: Shard | None) -> Config:
        every = configured + discovered
        api = replace(self.api, rate_share=shard.count if shard is not None else 1)
        if shard is None:
            return replace(self, api=api, org_sets=every, shard=None, all_org_sets=(), discovered_org_sets=discovered)
        return replace(self, api=api, org_sets=tuple(s for s in every if shard.owns(s.name)), shard=shard,
                       all_org_sets=every, discovered_org_sets=discovered)

    def summary(self) -> str:
        schedules = sum(len(s.windows) for s in self.org_sets)
        sets = f"{len(self.org_sets)} org set(s)"
        if self.shard is not None:
            sets = f"shard {self.shard}: {len(self.org_sets)} of {len(self.all_org_sets)} org set(s)"
        discovery = "; discovery of organizations on" if self.discovery.organizations else ""
        return (
            f"{self.source}: OK: {sets}, {schedules} schedule(s) (org set x window), "
            f"API {self.api.version} {self.api.base_url}, listen {self.server.listen}{discovery}"
        )


# --- scalar parsers (also used by the CLI) ----------------------------------------------------

_DURATION_RE: Final = re.compile(f"^{DURATION_RE_TEXT}$")
_DURATION_UNITS: Final = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)
# A Prometheus label name, and what a metric name suffix taken from outside may be.
IDENTIFIER_RE: Final = re.compile(LABEL_NAME_RE_TEXT)
_SECRET_ENV_RE: Final = re.compile(r"KEY|TOKEN|SECRET|PASSW", re.IGNORECASE)
# Devin API keys (`apk_user_…`, `apk_…`) and service user tokens (`cog_…`): a key written literally
# into the wrong field (say api_key_file: apk_user_…, or as a base_url) would otherwise be quoted back
# in the error and the log.
_API_KEY_SHAPE_RE: Final = re.compile(r"(apk|cog)_[A-Za-z0-9_\-]{6,}")


def parse_duration(text: str) -> float:
    """Prometheus duration syntax (`30s`, `1h30m`, `2w`) to seconds; ValueError otherwise."""
    match = _DURATION_RE.match(text)
    if text == "0":
        return 0.0
    if not text or match is None:
        raise ValueError(f"{text!r} is not a duration like 30s, 5m, 1h30m, 7d")
    seconds = float(sum(int(n) * unit for n, unit in zip(match.groups(), _DURATION_UNITS, strict=True) if n))
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError(f"{text!r} is longer than the maximum of 100y")
    return seconds


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` to (host, port); ValueError otherwise."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (for example 0.0.0.0:9877)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port_text)


# --- sections: what the schema cannot say -----------------------------------------------------
#
# config_schema.convert() has checked every key and type; each function here gets its section
# typed, with a Node that carries the key path for errors.

# The keys of each section, as declared (tests and the chart's schema check against them).
_TOP_KEYS: Final = ConfigFile.__struct_fields__
_API_KEYS: Final = ApiSection.__struct_fields__
_POLL_KEYS: Final = PollSection.__struct_fields__
_WINDOW_KEYS: Final = WindowEntry.__struct_fields__
_ORG_SET_KEYS: Final = OrgSetEntry.__struct_fields__
_SERVER_KEYS: Final = ServerSection.__struct_fields__
_COLLECTOR_SECTIONS: Final[Mapping[CollectorName, type[AnyCollectorSection]]] = MappingProxyType({
    "usage": UsageCollector, "active_users": ActiveUsersCollector, "consumption": ConsumptionCollector,
    "organizations": OrganizationsCollector, "queue": QueueCollector,
})
_COLLECTOR_KEYS: Final = MappingProxyType({name: s.__struct_fields__ for name, s in _COLLECTOR_SECTIONS.items()})
_DISCOVERY_KEYS: Final = DiscoverySection.__struct_fields__


def _text(node: Node) -> str:
    """The node's string, which must not be blank."""
    assert isinstance(node.value, str), node.path  # the schema says so
    if not node.value.strip():
        node.fail("must not be empty")
    return node.value


def _duration(node: Node) -> float:
    assert isinstance(node.value, str), node.path
    try:
        return parse_duration(node.value)
    except ValueError as exc:
        node.fail(str(exc))


def _interval(node: Node) -> float:
    seconds = _duration(node)
    if seconds < 1:
        node.fail("must be at least 1s")
    return seconds


def _finite(node: Node, value: float) -> float:
    if not math.isfinite(value):  # the schema's bounds let +inf through
        node.fail(f"must be a finite number, got {value}")
    return value


def _api(section: ApiSection, node: Node, env: Mapping[str, str], base_dir: Path) -> tuple[ApiSettings, Node]:
    """The API settings with `version` not yet resolved (see _resolve_version), and the node the key
    came from, for errors about it."""
    url_node = node.child("base_url", section.base_url)
    base_url = _text(url_node)
    try:
        parts = urlsplit(base_url)
        parts.port  # noqa: B018 - raises ValueError on a port out of range
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        url_node.fail(f"{base_url!r} is not an http(s) URL like {DEFAULT_BASE_URL}")
    if parts.username is not None or parts.password is not None:
        # Credentials in the URL would show on the landing page and in logs; the key has its own field.
        url_node.fail("must not contain credentials (user:password@); the key goes in api.api_key")
    key_file: str | None = None
    if section.api_key is not UNSET and section.api_key_file is not UNSET:
        node.fail("set either api_key or api_key_file, not both")
    if section.api_key_file is not UNSET:
        key_node = node.child("api_key_file", section.api_key_file)
        key_file = _text(key_node)
        api_key = read_api_key_file(key_node, base_dir)
    elif section.api_key is not UNSET:
        key_node = node.child("api_key", section.api_key)
        api_key = section.api_key.strip()
        if not api_key:
            key_node.fail("the API key is empty (is the environment variable set and non-empty?)")
    else:
        api_key = env.get(API_KEY_ENV, "").strip()
        key_node = node.child("api_key", None)
        if not api_key:
            key_node.fail(f"missing: set api.api_key, api.api_key_file or the {API_KEY_ENV} environment variable")
    timeout = node.child("timeout", section.timeout)
    return ApiSettings(
        base_url=base_url.rstrip("/"),
        api_key=ApiKey(api_key),
        timeout=_positive(timeout, _duration(timeout)),
        max_concurrency=section.max_concurrency,
        max_requests_per_second=_finite(node.child("max_requests_per_second", None),
                                        section.max_requests_per_second),
        retries=section.retries,
        api_key_file=key_file,
        version_setting=section.version,
    ), key_node


def _resolve_version(api: ApiSettings, key_node: Node, version_node: Node) -> ApiSettings:
    """`api` with its version resolved: auto follows the key's prefix, and an explicit version must
    fit the key (an explicit version accepts a key of another shape: the API decides)."""
    key = api.api_key.reveal()
    detected: ApiVersion | None = (
        "v3" if key.startswith(V3_TOKEN_PREFIX) else "v2" if key.startswith(V2_KEY_PREFIXES) else None)
    setting = api.version_setting
    where = "the key in api.api_key_file" if api.api_key_file is not None else (
        "the API key" if key_node.value is not None else f"the API key in ${API_KEY_ENV}")
    if setting == "auto":
        if detected is None:
            key_node.fail(
                f"{where} is neither a service user token ({V3_TOKEN_PREFIX}..., API v3) nor a personal API "
                f"key ({' or '.join(p + '...' for p in V2_KEY_PREFIXES)}, API v2); "
                "check the key, or set api.version")
        return replace(api, version=detected)
    if detected is not None and detected != setting:
        kind = "a service user token (cog_..., API v3)" if detected == "v3" else "a personal API key (apk_..., API v2)"
        version_node.fail(f"is {setting}, but {where} is {kind}; set api.version to {detected} or auto, "
                          f"or use {'a cog_ token' if setting == 'v3' else 'an apk_ key'}")
    return replace(api, version=setting)


def _positive(node: Node, seconds: float) -> float:
    if seconds <= 0:
        node.fail("must be greater than 0s (0 would disable the timeout)")
    return seconds


def read_api_key_file(node: Node, base_dir: Path) -> str:
    path = base_dir / str(node.value)
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        node.fail(f"cannot read {path}: {exc.strerror or exc}")
    except UnicodeDecodeError:
        node.fail(f"{path} is not UTF-8 text")
    except ValueError as exc:  # e.g. an embedded null byte in the path
        node.fail(f"cannot read {str(path)!r}: {exc}")
    if not key:
        node.fail(f"{path} is empty")
    return key


def _poll(section: PollSection, node: Node) -> PollSettings:
    interval = _interval(node.child("interval", section.interval))
    timezone = node.child("timezone", section.timezone)
    tz_name = _text(timezone)
    try:
        ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError):
        timezone.fail(f"{tz_name!r} is not an IANA time zone like UTC or America/Los_Angeles")
    return PollSettings(
        interval=interval,
        jitter=section.jitter,  # the schema's bounds, [0, 1), leave no room for nan or inf
        delay=_duration(node.child("delay", section.delay)),
        stale_after=section.stale_after,
        timezone=tz_name,
    )


def _window(item: str | WindowEntry, node: Node, default_interval: float) -> Window:
    interval = default_interval
    explicit = False
    if isinstance(item, WindowEntry):
        if item.interval is not UNSET:
            interval = _interval(node.child("interval", item.interval))
            explicit = True
        node = node.child("range", item.range)
    try:
        return parse_window(_text(node), interval, explicit=explicit)
    except ValueError as exc:
        node.fail(str(exc))


def parse_window(name: str, interval: float, *, explicit: bool = False) -> Window:
    """A window as written (`24h`, `today`, `billing_cycle`, ...); ValueError saying why it is none
    (also for `backfill --windows`)."""
    if name in CALENDAR_WINDOWS:
        return Window(name=name, kind=name, range_seconds=None, interval=interval, interval_explicit=explicit)
    try:
        seconds = parse_duration(name)
    except ValueError as exc:
        if _DURATION_RE.match(name):
            raise  # well-formed but out of range
        raise ValueError(f"{name!r} is not a window: use a duration like 24h or 7d, or one of "
                         f"{', '.join(CALENDAR_WINDOWS)}") from exc
    if seconds < MIN_WINDOW_SECONDS:
        raise ValueError(f"window {name!r} is shorter than the minimum of 1m")
    return Window(name=name, kind="range", range_seconds=seconds, interval=interval, interval_explicit=explicit)


def _windows(items: tuple[str | WindowEntry, ...], node: Node, default_interval: float) -> tuple[Window, ...]:
    if not items:
        node.fail("must list at least one window")
    windows = tuple(_window(item, node.child(i, item), default_interval) for i, item in enumerate(items))
    for i, window in enumerate(windows):
        if any(other.name == window.name for other in windows[:i]):
            node.child(i, None).fail(f"window {window.name!r} is listed twice")
    return windows


def _labels(labels: Mapping[str, str] | None, node: Node) -> tuple[tuple[str, str], ...]:
    """Static labels: valid Prometheus names the exporter does not set itself."""
    for name in labels or {}:
        if not IDENTIFIER_RE.fullmatch(name) or name.startswith("__"):
            node.child(name, None).fail(
                f"{name!r} is not a valid Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*, no leading __)")
        if name in RESERVED_LABELS:
            node.child(name, None).fail(f"label {name!r} is set by the exporter itself; choose another name")
    return tuple(sorted((labels or {}).items()))


def _ids(items: tuple[str, ...] | None, node: Node) -> tuple[str, ...]:
    return tuple(_text(node.child(i, item)) for i, item in enumerate(items or ()))


def _org_sets(entries: tuple[OrgSetEntry, ...] | None, node: Node, global_windows: tuple[Window, ...],
              interval: float, *, discovery: bool) -> tuple[OrgSet, ...]:
    if not entries:
        if discovery:
            return ()  # discovery.organizations makes the sets
        node.fail("must list at least one org set (for example `- name: enterprise`), "
                  "or turn on discovery.organizations")
    sets: list[OrgSet] = []
    names: set[str] = set()  # not a scan of `sets`: that is quadratic, and configs reach thousands
    for i, entry in enumerate(entries):
        item = node.child(i, entry)
        name_node = item.child("name", entry.name)
        name = _text(name_node).strip()
        if name in names:
            name_node.fail(f"duplicate org set name {name!r}")
        names.add(name)
        windows = (global_windows if entry.windows is UNSET
                   else _windows(entry.windows, item.child("windows", None), interval))
        sets.append(OrgSet(
            name=name,
            org_ids=_ids(entry.org_ids, item.child("org_ids", None)),
            user_ids=_ids(entry.user_ids, item.child("user_ids", None)),
            labels=_labels(entry.labels, item.child("labels", None)),
            windows=windows,
        ))
    return tuple(sets)


@dataclass(frozen=True)
class _WrittenCollector:
    """A collector as written, before the API version decides the v3-only ones."""

    settings: CollectorSettings  # enabled unless written otherwise
    enabled: Node | None  # the `enabled` key if written


def _collectors(section: CollectorsSection, node: Node, poll_interval: float) -> dict[CollectorName, _WrittenCollector]:
    out: dict[CollectorName, _WrittenCollector] = {}
    for name, declared in _COLLECTOR_SECTIONS.items():
        written: AnyCollectorSection = getattr(section, name) or declared()
        at = node.child(name, None)
        interval = poll_interval if written.interval is UNSET else _interval(at.child("interval", written.interval))
        windows: tuple[Window, ...] | None = None
        if isinstance(written, (UsageCollector, ActiveUsersCollector, ConsumptionCollector)) and (
                written.windows is not UNSET):
            windows = _windows(written.windows, at.child("windows", None), interval)
        active_users = written if isinstance(written, ActiveUsersCollector) else ActiveUsersCollector()
        out[name] = _WrittenCollector(
            CollectorSettings(
                name=name,
                enabled=True if written.enabled is UNSET else written.enabled,
                interval=interval,
                windows=windows,
                min_sessions=active_users.min_sessions,
                min_searches=active_users.min_searches,
            ),
            None if written.enabled is UNSET else at.child("enabled", written.enabled),
        )
    return out


def _for_version(collector: _WrittenCollector, version: ApiVersion, api: ApiSettings | None = None,
                 notes: list[str] | None = None) -> CollectorSettings:
    """The collector on API `version`: a v3-only one left without `enabled` is off on v2 (with a
    note); written `enabled: true` on v2 it is an error."""
    settings = collector.settings
    if version == "v2" and settings.name in V3_ONLY_COLLECTORS:
        if collector.enabled is None:
            if notes is not None:
                notes.append(f"collector {settings.name} is v3-only; off on API v2")
            return replace(settings, enabled=False)
        if settings.enabled:
            why = ("api.version is v2" if api is not None and api.version_setting == "v2"
                   else "the API key is a v2 key (apk_...)")
            collector.enabled.fail(
                f"collector {settings.name} needs API v3 (a service user token, cog_...), but the API is v2: "
                f"{why}; remove `enabled: true` or set it to false")
    return settings


def _discovery(section: DiscoverySection, node: Node, poll_interval: float) -> DiscoverySettings:
    return DiscoverySettings(
        organizations=section.organizations,
        windows=None if section.windows is UNSET else _windows(section.windows, node.child("windows", None),
                                                               poll_interval),
        labels=_labels(section.labels, node.child("labels", None)),
        exclude=_ids(section.exclude, node.child("exclude", None)),
    )


def _server(section: ServerSection, node: Node, base_dir: Path) -> ServerSettings:
    listen = node.child("listen", section.listen)
    try:
        host, port = parse_listen(_text(listen))
    except ValueError as exc:
        listen.fail(str(exc))
    web_config: str | None = None
    if section.web_config_file is not None:
        file = node.child("web_config_file", section.web_config_file)
        web_config = str(base_dir / _text(file))
        if not Path(web_config).is_file():
            file.fail(f"{web_config} does not exist")
    # Parsed here so --check-config and a SIGHUP reload catch a broken web config (TLS, users).
    # Imported here: bcrypt and the TLS code load only for a config that has a web config.
    from exporter.webconfig import load_web_config

    parsed = load_web_config(web_config) if web_config is not None else None
    return ServerSettings(host=host, port=port, web_config_file=web_config, web_config=parsed,
                          enable_lifecycle=section.enable_lifecycle)


def _shard(text: str | None, node: Node, env: Mapping[str, str]) -> Shard | None:
    if not text:  # empty: `shard: ${EXPORTER_SHARD:-}` left unset
        return None
    try:
        return parse_shard(text, env)
    except ValueError as exc:
        node.fail(str(exc))


# --- entry points -----------------------------------------------------------------------------


def parse_config(text: str, source: str = "<config>", *, env: Mapping[str, str] | None = None,
                 base_dir: Path | None = None) -> Config:
    """Parse and validate a config document; raise ConfigError naming the file and key path."""
    env = os.environ if env is None else env
    try:
        return _parse_config(text, source, env, base_dir)
    except ConfigError as exc:
        # A key put in the wrong field (say api_key_file: ${DEVIN_API_KEY}) would be quoted back.
        message = str(exc)
        for name, value in env.items():
            if len(value) >= 8 and _SECRET_ENV_RE.search(name) and value in message:
                message = message.replace(value, f"<${{{name}}}>")
        message = _API_KEY_SHAPE_RE.sub(lambda match: f"{match.group(1)}_***", message)
        raise ConfigError(message) from None


def _parse_config(text: str, source: str, env: Mapping[str, str], base_dir: Path | None) -> Config:
    try:
        return _build_config(text, source, env, base_dir)
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: an alias refers to itself or nests too deeply") from None


def _build_config(text: str, source: str, env: Mapping[str, str], base_dir: Path | None) -> Config:
    base_dir = Path(".") if base_dir is None else base_dir
    root = Node(parse_yaml(text, source), "", source)
    if root.value is None:
        root.fail("the file is empty; see config.example.yaml")
    file = convert(expand_env(root, env), source)
    poll = _poll(file.poll or PollSection(), root.child("poll", None))
    windows = _windows(file.windows, root.child("windows", None), poll.interval)
    api_node = root.child("api", None)
    api, key_node = _api(file.api or ApiSection(), api_node, env, base_dir)
    written = _collectors(file.collectors or CollectorsSection(), root.child("collectors", None), poll.interval)
    discovery = _discovery(file.discovery or DiscoverySection(), root.child("discovery", None), poll.interval)
    org_sets = _org_sets(file.org_sets, root.child("org_sets", None), windows, poll.interval,
                         discovery=discovery.organizations)
    server = _server(file.server or ServerSection(), root.child("server", None), base_dir)
    shard = _shard(file.shard, root.child("shard", None), env)
    # Last, so that a mistake elsewhere is named before a key that does not fit the version.
    api = _resolve_version(api, key_node, api_node.child("version", api.version_setting))
    notes: list[str] = []
    collectors: dict[str, CollectorSettings] = {
        name: _for_version(c, api.version, api, notes) for name, c in written.items()}
    if discovery.organizations and not collectors["organizations"].enabled:
        root.child("discovery", None).child("organizations", True).fail(
            "needs the organizations collector, but collectors.organizations.enabled is false")
    config = Config(
        api=api,
        poll=poll,
        windows=windows,
        org_sets=org_sets,
        server=server,
        source=source,
        collectors=collectors,
        discovery=discovery,
        notes=tuple(notes),
    )
    # Every org set was validated above (a duplicate name is an error on every replica alike).
    return config.with_shard(shard) if shard is not None else config


def load_config(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the config file at `path` (relative paths inside resolve from its folder)."""
    file = Path(path)
    return parse_config(read_text(file, "config"), str(file), env=env, base_dir=file.parent)
