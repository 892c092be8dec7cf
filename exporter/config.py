"""Turns the YAML config file into frozen, typed objects; every validation rule lives here."""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Literal, NoReturn
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from exporter.secret import ApiKey
from exporter.shard import Shard, parse_shard

if TYPE_CHECKING:  # webconfig.py imports this module's YAML walker
    from exporter.webconfig import WebConfig

DEFAULT_BASE_URL: Final = "https://api.devin.ai"
DEFAULT_WINDOWS: Final = ("1h", "24h", "7d", "30d")
API_KEY_ENV: Final = "DEVIN_API_KEY"
MIN_WINDOW_SECONDS: Final = 60.0
# Beyond this, date arithmetic overflows and no real window or timeout is meant.
MAX_DURATION_SECONDS: Final = 100 * 365 * 86400.0
# Labels the exporter sets itself on some series (org_id on discovered sets, origin/size on the
# sessions breakdowns, product on ACUs, status on the queue); a static label of the same name would
# make series ambiguous.
RESERVED_LABELS: Final = frozenset({"org", "window", "org_id", "origin", "size", "product", "status", "collector"})

WindowKind = Literal["range", "today", "month_to_date", "billing_cycle"]
CALENDAR_WINDOWS: Final[tuple[WindowKind, ...]] = ("today", "month_to_date", "billing_cycle")

ApiVersion = Literal["v2", "v3"]
ApiVersionSetting = Literal["auto", "v2", "v3"]
API_VERSION_SETTINGS: Final[tuple[ApiVersionSetting, ...]] = ("auto", "v3", "v2")
V3_TOKEN_PREFIX: Final = "cog_"  # a service user's token
V2_KEY_PREFIXES: Final = ("apk_user_", "apk_")  # an enterprise admin's personal API key, a legacy key

CollectorName = Literal["usage", "active_users", "consumption", "organizations", "queue"]
COLLECTOR_NAMES: Final[tuple[CollectorName, ...]] = ("usage", "active_users", "consumption", "organizations",
                                                      "queue")
V3_ONLY_COLLECTORS: Final[frozenset[CollectorName]] = frozenset({"active_users", "queue"})
WINDOWED_COLLECTORS: Final[frozenset[CollectorName]] = frozenset({"usage", "active_users", "consumption"})
DEFAULT_CONSUMPTION_WINDOWS: Final = ("today", "7d", "30d", "billing_cycle")
# Collectors whose interval is not poll.interval by default, in seconds.
DEFAULT_COLLECTOR_INTERVALS: Final[Mapping[CollectorName, float]] = MappingProxyType(
    {"consumption": 1800.0, "organizations": 3600.0, "queue": 60.0})


class ConfigError(Exception):
    """A config problem, already phrased for the user: file, key path, what is wrong."""

    def __init__(self, message: str) -> None:
        # Always one line: YAML reader errors and keys taken from the file may hold line breaks.
        super().__init__(" ".join(line.strip() for line in message.splitlines()))


# --- value types -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiSettings:
    """How to reach the Devin API and how hard to press on it."""

    base_url: str
    api_key: ApiKey
    timeout: float = 30.0  # seconds, per request attempt
    max_concurrency: int = 4  # requests in flight at once, all org sets together
    max_requests_per_second: float = 2.0  # across all org sets
    retries: int = 3  # extra attempts after the first, on retryable failures
    api_key_file: str | None = None  # where the key came from, so a reload re-reads it
    version: ApiVersion = "v2"  # resolved from version_setting and the key; parse_config always sets it
    version_setting: ApiVersionSetting = "auto"  # api.version as written


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
    """Every collector at its defaults: what a config without `collectors` gets."""
    consumption_interval = DEFAULT_COLLECTOR_INTERVALS["consumption"]
    consumption_windows = tuple(_default_window(name, consumption_interval) for name in DEFAULT_CONSUMPTION_WINDOWS)
    return MappingProxyType({
        name: CollectorSettings(
            name=name,
            enabled=version == "v3" or name not in V3_ONLY_COLLECTORS,
            interval=DEFAULT_COLLECTOR_INTERVALS.get(name, poll_interval),
            windows=consumption_windows if name == "consumption" else None,
        )
        for name in COLLECTOR_NAMES
    })


def _default_window(name: str, interval: float) -> Window:
    if name in CALENDAR_WINDOWS:
        return Window(name=name, kind=name, range_seconds=None, interval=interval)
    return Window(name=name, kind="range", range_seconds=parse_duration(name), interval=interval)


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
        collectors = {**default_collectors(self.poll.interval, self.api.version), **self.collectors}
        if set(collectors) != set(COLLECTOR_NAMES):
            raise ValueError(f"unknown collector(s): {', '.join(sorted(set(collectors) - set(COLLECTOR_NAMES)))}")
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
        if shard is None:
            return replace(self, org_sets=every, shard=None, all_org_sets=(), discovered_org_sets=discovered)
        return replace(self, org_sets=tuple(s for s in every if shard.owns(s.name)), shard=shard,
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

_DURATION_RE: Final = re.compile(
    r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$"
)
_DURATION_UNITS: Final = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)
# A Prometheus label name, and what a metric name suffix taken from outside may be.
IDENTIFIER_RE: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_SECRET_ENV_RE: Final = re.compile(r"KEY|TOKEN|SECRET|PASSW", re.IGNORECASE)
# Devin API keys (`apk_user_…`, `apk_…`) and service user tokens (`cog_…`): a key written literally
# into the wrong field (say api_key_file: apk_user_…, or as a base_url) would otherwise be quoted back
# in the error and the log.
_API_KEY_SHAPE_RE: Final = re.compile(r"(apk|cog)_[A-Za-z0-9_\-]{6,}")
_ENV_RE: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


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


# --- the document walker ----------------------------------------------------------------------


class _Node:
    """A value in the YAML document with its key path, so every error can say where it is."""

    def __init__(self, value: object, path: str, source: str) -> None:
        self.value = value
        self.path = path
        self.source = source

    def fail(self, problem: str) -> NoReturn:
        where = f"{self.path}: " if self.path else ""
        raise ConfigError(f"{self.source}: {where}{problem}")

    def child(self, key: str | int, value: object) -> _Node:
        path = f"{self.path}[{key}]" if isinstance(key, int) else f"{self.path}.{key}" if self.path else key
        return _Node(value, path, self.source)

    def mapping(self, allowed: Sequence[str]) -> dict[str, _Node]:
        """The node as a mapping with only `allowed` keys; a typo is named with a suggestion."""
        if self.value is None:
            return {}
        if not isinstance(self.value, dict):
            self.fail(f"must be a mapping (key: value), got {_describe(self.value)}")
        out: dict[str, _Node] = {}
        for key, value in self.value.items():
            if not isinstance(key, str):
                self.fail(f"key {key!r} must be a string")
            if key not in allowed:
                near = difflib.get_close_matches(key, allowed, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(allowed)}"
                self.child(key, value).fail(f"unknown key{hint}")
            out[key] = self.child(key, value)
        return out

    def entries(self, what: str) -> list[tuple[object, _Node]]:
        """A mapping with keys of the user's choosing (labels, users): (key, its node) pairs; none if unset."""
        if self.value is None:
            return []
        if not isinstance(self.value, dict):
            self.fail(f"must be a mapping of {what}, got {_describe(self.value)}")
        return [(key, self.child(str(key), value)) for key, value in self.value.items()]

    def sequence(self) -> list[_Node]:
        if not isinstance(self.value, list):
            self.fail(f"must be a list, got {_describe(self.value)}")
        return [self.child(i, v) for i, v in enumerate(self.value)]

    def string(self, *, allow_empty: bool = False) -> str:
        if not isinstance(self.value, str):
            self.fail(f"must be a string, got {_describe(self.value)}")
        if not allow_empty and not self.value.strip():
            self.fail("must not be empty")
        return self.value

    def duration(self) -> float:
        if isinstance(self.value, bool) or not isinstance(self.value, str):
            self.fail(f"{self.value!r} is not a duration like 30s, 5m, 1h30m, 7d (a unit is required)")
        try:
            return parse_duration(self.value)
        except ValueError as exc:
            self.fail(str(exc))

    def boolean(self) -> bool:
        if not isinstance(self.value, bool):
            self.fail(f"must be true or false, got {_describe(self.value)}")
        return self.value

    def integer(self, *, minimum: int) -> int:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            self.fail(f"must be an integer, got {_describe(self.value)}")
        if self.value < minimum:
            self.fail(f"must be at least {minimum}, got {self.value}")
        return self.value

    def number(self, *, above: float | None = None, at_least: float | None = None,
               below: float | None = None) -> float:
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            self.fail(f"must be a number, got {_describe(self.value)}")
        value = float(self.value)
        if not math.isfinite(value):
            self.fail(f"must be a finite number, got {self.value}")
        if above is not None and value <= above:
            self.fail(f"must be greater than {above:g}, got {self.value}")
        if at_least is not None and value < at_least:
            self.fail(f"must be at least {at_least:g}, got {self.value}")
        if below is not None and value >= below:
            self.fail(f"must be less than {below:g}, got {self.value}")
        return value

    def string_list(self) -> tuple[str, ...]:
        if self.value is None:
            return ()
        return tuple(item.string() for item in self.sequence())


def _describe(value: object) -> str:
    if value is None:
        return "nothing (null)"
    kind = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)
    return f"{kind} ({value!r})" if isinstance(value, (str, int, float)) else kind


# --- YAML loading -----------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys: YAML would silently keep the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor`; construct_mapping merges it
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):
            continue  # construct_mapping reports "found unhashable key" with its position
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> object:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{source}: {where}invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None


def _expand_env(node: _Node, env: Mapping[str, str]) -> object:
    """Expand ${VAR} and ${VAR:-default} in every string of the document."""
    value = node.value
    if isinstance(value, str):
        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if default is not None:  # as in the shell: the default also replaces an empty value
                return env.get(name) or default
            if name in env:
                return env[name]
            node.fail(f"environment variable {name} is not set")
        return _ENV_RE.sub(replace, value)
    if isinstance(value, dict):
        return {k: _expand_env(node.child(str(k), v), env) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(node.child(i, v), env) for i, v in enumerate(value)]
    return value


# --- sections ---------------------------------------------------------------------------------

_TOP_KEYS: Final = ("api", "poll", "windows", "org_sets", "server", "shard", "collectors", "discovery")
_API_KEYS: Final = ("base_url", "version", "api_key", "api_key_file", "timeout", "max_concurrency",
                    "max_requests_per_second", "retries")
_POLL_KEYS: Final = ("interval", "jitter", "delay", "stale_after", "timezone")
_WINDOW_KEYS: Final = ("range", "interval")
_ORG_SET_KEYS: Final = ("name", "org_ids", "user_ids", "labels", "windows")
_SERVER_KEYS: Final = ("listen", "web_config_file", "enable_lifecycle")
_COLLECTOR_KEYS: Final[Mapping[CollectorName, tuple[str, ...]]] = MappingProxyType({
    "usage": ("enabled", "interval", "windows"),
    "active_users": ("enabled", "interval", "windows", "min_sessions", "min_searches"),
    "consumption": ("enabled", "interval", "windows"),
    "organizations": ("enabled", "interval"),
    "queue": ("enabled", "interval"),
})
_DISCOVERY_KEYS: Final = ("organizations", "windows", "labels", "exclude")


def _api(node: _Node, env: Mapping[str, str], base_dir: Path) -> tuple[ApiSettings, _Node]:
    """The API settings with `version` not yet resolved (see _resolve_version), and the node the key
    came from, for errors about it."""
    keys = node.mapping(_API_KEYS)
    base_url = keys["base_url"].string() if "base_url" in keys else DEFAULT_BASE_URL
    try:
        parts = urlsplit(base_url)
        parts.port  # noqa: B018 - raises ValueError on a port out of range
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        keys["base_url"].fail(f"{base_url!r} is not an http(s) URL like {DEFAULT_BASE_URL}")
    if parts.username is not None or parts.password is not None:
        # Credentials in the URL would show on the landing page and in logs; the key has its own field.
        keys["base_url"].fail("must not contain credentials (user:password@); the key goes in api.api_key")
    version_setting: ApiVersionSetting = "auto"
    if "version" in keys:
        written = keys["version"].string()
        if written not in API_VERSION_SETTINGS:
            keys["version"].fail(f"{written!r} is not an API version: use auto, v3 or v2")
        version_setting = written
    key_file: str | None = None
    if "api_key" in keys and "api_key_file" in keys:
        node.fail("set either api_key or api_key_file, not both")
    if "api_key_file" in keys:
        key_file = keys["api_key_file"].string()
        api_key = read_api_key_file(keys["api_key_file"], base_dir)
        key_node = keys["api_key_file"]
    elif "api_key" in keys:
        api_key = keys["api_key"].string(allow_empty=True).strip()
        if not api_key:
            keys["api_key"].fail("the API key is empty (is the environment variable set and non-empty?)")
        key_node = keys["api_key"]
    else:
        api_key = env.get(API_KEY_ENV, "").strip()
        key_node = node.child("api_key", None)
        if not api_key:
            key_node.fail(f"missing: set api.api_key, api.api_key_file or the {API_KEY_ENV} environment variable")
    defaults = ApiSettings(base_url=DEFAULT_BASE_URL, api_key=ApiKey(""))  # every default lives there
    return ApiSettings(
        base_url=base_url.rstrip("/"),
        api_key=ApiKey(api_key),
        timeout=_positive(keys["timeout"], keys["timeout"].duration()) if "timeout" in keys else defaults.timeout,
        max_concurrency=(keys["max_concurrency"].integer(minimum=1) if "max_concurrency" in keys
                         else defaults.max_concurrency),
        max_requests_per_second=(keys["max_requests_per_second"].number(above=0)
                                 if "max_requests_per_second" in keys else defaults.max_requests_per_second),
        retries=keys["retries"].integer(minimum=0) if "retries" in keys else defaults.retries,
        api_key_file=key_file,
        version_setting=version_setting,
    ), key_node


def _resolve_version(api: ApiSettings, key_node: _Node, version_node: _Node) -> ApiSettings:
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


def _positive(node: _Node, seconds: float) -> float:
    if seconds <= 0:
        node.fail("must be greater than 0s (0 would disable the timeout)")
    return seconds


def read_api_key_file(node: _Node, base_dir: Path) -> str:
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


def _poll(node: _Node) -> PollSettings:
    keys = node.mapping(_POLL_KEYS)
    defaults = PollSettings()
    interval = keys["interval"].duration() if "interval" in keys else defaults.interval
    if interval < 1:
        keys["interval"].fail("must be at least 1s")
    tz_name = keys["timezone"].string() if "timezone" in keys else defaults.timezone
    try:
        ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError):
        keys["timezone"].fail(f"{tz_name!r} is not an IANA time zone like UTC or America/Los_Angeles")
    return PollSettings(
        interval=interval,
        jitter=keys["jitter"].number(at_least=0, below=1) if "jitter" in keys else defaults.jitter,
        delay=keys["delay"].duration() if "delay" in keys else defaults.delay,
        stale_after=keys["stale_after"].integer(minimum=1) if "stale_after" in keys else defaults.stale_after,
        timezone=tz_name,
    )


def _window(node: _Node, default_interval: float) -> Window:
    interval = default_interval
    explicit = False
    if isinstance(node.value, dict):
        keys = node.mapping(_WINDOW_KEYS)
        if "range" not in keys:
            node.fail("a window entry needs `range` (for example {range: 30d, interval: 30m})")
        if "interval" in keys:
            interval = _interval(keys["interval"])
            explicit = True
        node = keys["range"]
    name = node.string() if isinstance(node.value, str) else node.fail(
        f"{node.value!r} is not a window: use a duration like 24h or 7d, or one of "
        f"{', '.join(CALENDAR_WINDOWS)}"
    )
    if name in CALENDAR_WINDOWS:
        return Window(name=name, kind=name, range_seconds=None, interval=interval, interval_explicit=explicit)
    try:
        seconds = parse_duration(name)
    except ValueError as exc:
        if _DURATION_RE.match(name):
            node.fail(str(exc))  # well-formed but out of range
        node.fail(f"{name!r} is not a window: use a duration like 24h or 7d, or one of "
                  f"{', '.join(CALENDAR_WINDOWS)}")
    if seconds < MIN_WINDOW_SECONDS:
        node.fail(f"window {name!r} is shorter than the minimum of 1m")
    return Window(name=name, kind="range", range_seconds=seconds, interval=interval, interval_explicit=explicit)


def _interval(node: _Node) -> float:
    seconds = node.duration()
    if seconds < 1:
        node.fail("must be at least 1s")
    return seconds


def _windows(node: _Node, default_interval: float) -> tuple[Window, ...]:
    items = node.sequence()
    if not items:
        node.fail("must list at least one window")
    windows = tuple(_window(item, default_interval) for item in items)
    for i, window in enumerate(windows):
        if any(other.name == window.name for other in windows[:i]):
            items[i].fail(f"window {window.name!r} is listed twice")
    return windows


def _labels(node: _Node) -> tuple[tuple[str, str], ...]:
    """Static labels: valid Prometheus names the exporter does not set itself, string values."""
    labels: list[tuple[str, str]] = []
    for name, child in node.entries("label name to value"):
        value = child.value
        if not isinstance(name, str) or not IDENTIFIER_RE.fullmatch(name) or name.startswith("__"):
            child.fail(f"{name!r} is not a valid Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*, no leading __)")
        if name in RESERVED_LABELS:
            child.fail(f"label {name!r} is set by the exporter itself; choose another name")
        if not isinstance(value, str):
            child.fail(f"label values must be strings, got {_describe(value)}; quote it")
        labels.append((name, value))
    return tuple(sorted(labels))


def _org_sets(node: _Node, global_windows: tuple[Window, ...], interval: float, *,
              discovery: bool) -> tuple[OrgSet, ...]:
    if node.value is None or node.value == []:
        if discovery:
            return ()  # discovery.organizations makes the sets
        node.fail("must list at least one org set (for example `- name: enterprise`), "
                  "or turn on discovery.organizations")
    sets: list[OrgSet] = []
    names: set[str] = set()  # not a scan of `sets`: that is quadratic, and configs reach thousands
    for item in node.sequence():
        keys = item.mapping(_ORG_SET_KEYS)
        if "name" not in keys:
            item.fail("an org set needs a `name`")
        name = keys["name"].string().strip()
        if name in names:
            keys["name"].fail(f"duplicate org set name {name!r}")
        names.add(name)
        windows = _windows(keys["windows"], interval) if "windows" in keys else global_windows
        labels = _labels(keys["labels"]) if "labels" in keys else ()
        sets.append(OrgSet(
            name=name,
            org_ids=keys["org_ids"].string_list() if "org_ids" in keys else (),
            user_ids=keys["user_ids"].string_list() if "user_ids" in keys else (),
            labels=labels,
            windows=windows,
        ))
    return tuple(sets)


@dataclass(frozen=True)
class _WrittenCollector:
    """A collector as written, before the API version decides the v3-only ones."""

    settings: CollectorSettings  # enabled unless written otherwise
    enabled: _Node | None  # the `enabled` key if written


def _collectors(node: _Node, poll_interval: float) -> dict[CollectorName, _WrittenCollector]:
    sections = node.mapping(COLLECTOR_NAMES)
    defaults = default_collectors(poll_interval, "v3")
    out: dict[CollectorName, _WrittenCollector] = {}
    for name in COLLECTOR_NAMES:
        default = defaults[name]
        section = sections.get(name, node.child(name, None))
        keys = section.mapping(_COLLECTOR_KEYS[name])
        interval = _interval(keys["interval"]) if "interval" in keys else default.interval
        windows = default.windows
        if "windows" in keys:
            windows = _windows(keys["windows"], interval)
        elif windows is not None:  # consumption's own list follows its interval
            windows = tuple(replace(w, interval=interval) for w in windows)
        out[name] = _WrittenCollector(
            CollectorSettings(
                name=name,
                enabled=keys["enabled"].boolean() if "enabled" in keys else True,
                interval=interval,
                windows=windows,
                min_sessions=keys["min_sessions"].integer(minimum=0) if "min_sessions" in keys
                else default.min_sessions,
                min_searches=keys["min_searches"].integer(minimum=0) if "min_searches" in keys
                else default.min_searches,
            ),
            keys.get("enabled"),
        )
    return out


def _resolve_collectors(written: Mapping[CollectorName, _WrittenCollector], api: ApiSettings,
                        notes: list[str]) -> dict[str, CollectorSettings]:
    """The collectors for API `version`: a v3-only one left without `enabled` is off on v2 (with a
    note); written `enabled: true` on v2 it is an error."""
    out: dict[str, CollectorSettings] = {}
    why = "api.version is v2" if api.version_setting == "v2" else "the API key is a v2 key (apk_...)"
    for name, collector in written.items():
        settings = collector.settings
        if api.version == "v2" and name in V3_ONLY_COLLECTORS:
            if collector.enabled is None:
                settings = replace(settings, enabled=False)
                notes.append(f"collector {name} is v3-only; off on API v2")
            elif settings.enabled:
                collector.enabled.fail(
                    f"collector {name} needs API v3 (a service user token, cog_...), but the API is v2: {why}; "
                    "remove `enabled: true` or set it to false")
        out[name] = settings
    return out


def _discovery(node: _Node, poll_interval: float) -> DiscoverySettings:
    keys = node.mapping(_DISCOVERY_KEYS)
    return DiscoverySettings(
        organizations=keys["organizations"].boolean() if "organizations" in keys else False,
        windows=_windows(keys["windows"], poll_interval) if "windows" in keys else None,
        labels=_labels(keys["labels"]) if "labels" in keys else (),
        exclude=keys["exclude"].string_list() if "exclude" in keys else (),
    )


def _server(node: _Node, base_dir: Path) -> ServerSettings:
    keys = node.mapping(_SERVER_KEYS)
    defaults = ServerSettings()
    host, port = defaults.host, defaults.port
    if "listen" in keys:
        try:
            host, port = parse_listen(keys["listen"].string())
        except ValueError as exc:
            keys["listen"].fail(str(exc))
    web_config: str | None = None
    if "web_config_file" in keys and keys["web_config_file"].value is not None:
        web_config = str(base_dir / keys["web_config_file"].string())
        if not Path(web_config).is_file():
            keys["web_config_file"].fail(f"{web_config} does not exist")
    # Parsed here so --check-config and a SIGHUP reload catch a broken web config (TLS, users).
    from exporter.webconfig import load_web_config  # imports this module; loaded on first use

    parsed = load_web_config(web_config) if web_config is not None else None
    return ServerSettings(host=host, port=port, web_config_file=web_config, web_config=parsed,
                          enable_lifecycle=(keys["enable_lifecycle"].boolean() if "enable_lifecycle" in keys
                                            else defaults.enable_lifecycle))


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
    root = _Node(parse_yaml(text, source), "", source)
    if root.value is None:
        root.fail("the file is empty; see config.example.yaml")
    root = _Node(_expand_env(root, env), "", source)
    keys = root.mapping(_TOP_KEYS)

    def section(name: str) -> _Node:
        return keys.get(name, root.child(name, None))

    poll = _poll(section("poll"))
    if "windows" in keys:
        windows = _windows(keys["windows"], poll.interval)
    else:
        windows = tuple(_window(root.child("windows", w), poll.interval) for w in DEFAULT_WINDOWS)
    api, key_node = _api(section("api"), env, base_dir)
    written = _collectors(section("collectors"), poll.interval)
    discovery = _discovery(section("discovery"), poll.interval)
    org_sets = _org_sets(section("org_sets"), windows, poll.interval, discovery=discovery.organizations)
    server = _server(section("server"), base_dir)
    # Last, so that a mistake elsewhere is named before a key that does not fit the version.
    api = _resolve_version(api, key_node, section("api").child("version", api.version_setting))
    notes: list[str] = []
    collectors = _resolve_collectors(written, api, notes)
    if discovery.organizations and not collectors["organizations"].enabled:
        section("discovery").child("organizations", True).fail(
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
    return config.with_shard(_shard(keys["shard"], env)) if "shard" in keys else config


def _shard(node: _Node, env: Mapping[str, str]) -> Shard | None:
    if node.value is None or node.value == "":  # empty: `shard: ${EXPORTER_SHARD:-}` left unset
        return None
    if not isinstance(node.value, str):
        node.fail(f"must be INDEX/COUNT or auto/COUNT as a string (for example 0/3), "
                  f"got {_describe(node.value)}")
    try:
        return parse_shard(node.value, env)
    except ValueError as exc:
        node.fail(str(exc))


def load_config(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the config file at `path` (relative paths inside resolve from its folder)."""
    file = Path(path)
    return parse_config(read_text(file, "config"), str(file), env=env, base_dir=file.parent)


def read_text(file: Path, what: str) -> str:
    """The file's text, or a ConfigError naming the file and why it cannot be read."""
    try:
        return file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read {what}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not UTF-8 text") from None
