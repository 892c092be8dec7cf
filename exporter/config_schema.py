"""The config file's keys and types, declared once: msgspec Structs that check a document and emit its JSON Schema."""

from __future__ import annotations

import difflib
import json
import math
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Annotated, ClassVar, Final, Literal, NoReturn

import msgspec
import msgspec.inspect as mi
from msgspec import UNSET, Meta, Struct, UnsetType

from exporter.yamldoc import Node, describe

# The rules the schema states for editors, and config.py enforces with its own messages.
# Prometheus duration syntax; "0" alone is a duration too. The groups are the units, largest first.
DURATION_RE_TEXT: Final = r"(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?"
WindowKind = Literal["range", "today", "month_to_date", "billing_cycle"]
CALENDAR_WINDOWS: Final[tuple[WindowKind, ...]] = ("today", "month_to_date", "billing_cycle")
ApiVersionSetting = Literal["auto", "v3", "v2"]
LABEL_NAME_RE_TEXT: Final = r"[a-zA-Z_][a-zA-Z0-9_]*"  # a Prometheus label name
# Labels the exporter sets itself on some series (org_id on discovered sets, origin/size on the
# sessions breakdowns, product on ACUs, status on the queue); a static label of the same name would
# make series ambiguous.
RESERVED_LABELS: Final = frozenset({"org", "window", "org_id", "origin", "size", "product", "status", "collector"})

DEFAULT_BASE_URL: Final = "https://api.devin.ai"
DEFAULT_WINDOWS: Final = ("1h", "24h", "7d", "30d")
DEFAULT_CONSUMPTION_WINDOWS: Final = ("today", "7d", "30d", "billing_cycle")

SCHEMA_ID: Final = "https://json-schema.org/draft/2020-12/schema"

# `extra` is ours (msgspec keeps it for us): `kind` picks how a wrong type is phrased, `invalid` what
# an unknown choice of a Literal is told.
Duration = Annotated[str, Meta(
    description="a Prometheus duration: 30s, 5m, 1h30m, 7d, 2w",
    extra_json_schema={"minLength": 1, "pattern": f"^(?:0|{DURATION_RE_TEXT})$"},
    extra={"kind": "duration"},
)]
WindowName = Annotated[str, Meta(
    description="a duration of at least 1m, or today, month_to_date, billing_cycle (in poll.timezone)",
    extra_json_schema={"minLength": 1,
                       "pattern": f"^(?:{'|'.join(CALENDAR_WINDOWS)}|{DURATION_RE_TEXT})$"},
    extra={"kind": "window"},
)]
NonEmpty = Annotated[str, Meta(extra_json_schema={"minLength": 1, "pattern": r"\S"})]
Labels = Annotated[dict[str, str], Meta(
    description="static labels on the series: Prometheus label names, not " + ", ".join(sorted(RESERVED_LABELS))
    + " (the exporter sets those)",
    extra_json_schema={"propertyNames": {
        "pattern": f"^{LABEL_NAME_RE_TEXT}$",
        "not": {"anyOf": [{"pattern": "^__"}, {"enum": sorted(RESERVED_LABELS)}]},
    }},
    extra={"kind": "labels"},
)]


class _Section(Struct, forbid_unknown_fields=True):
    """A mapping of fixed keys; an unknown key is an error."""

    # Said when a required key is missing (or the whole mapping is null).
    missing: ClassVar[str] = ""


class WindowEntry(_Section):
    """A window with its own refresh period, which wins over its collector's interval."""

    missing: ClassVar[str] = "a window entry needs `range` (for example {range: 30d, interval: 30m})"

    range: WindowName
    interval: Annotated[Duration, Meta(description="how often to poll this window, at least 1s")] | UnsetType = UNSET


Window = Annotated[WindowName | WindowEntry, Meta(extra={"kind": "window"})]
Windows = Annotated[tuple[Window, ...], Meta(
    description="the windows, each the `window` label value as written",
    extra_json_schema={"minItems": 1},
)]


class ApiSection(_Section):
    """How to reach the Devin API and how hard to press on it."""

    base_url: Annotated[str, Meta(description="the Devin API; dedicated deployments set their own host")] = (
        DEFAULT_BASE_URL)
    version: Annotated[ApiVersionSetting, Meta(
        description="auto: v3 for a service user token (cog_...), v2 for a personal API key (apk_user_..., apk_); "
        "v3 or v2 must fit the key",
        extra={"invalid": "is not an API version: use auto, v3 or v2"},
    )] = "auto"
    api_key: Annotated[NonEmpty, Meta(
        description="the token or key, usually ${DEVIN_API_KEY}; default: $DEVIN_API_KEY",
    )] | UnsetType = UNSET
    api_key_file: Annotated[NonEmpty, Meta(
        description="a file holding the key, relative to the config file; instead of api_key",
    )] | UnsetType = UNSET
    timeout: Annotated[Duration, Meta(description="per request attempt")] = "30s"
    max_concurrency: Annotated[int, Meta(ge=1, description="requests in flight at once")] = 4
    max_requests_per_second: Annotated[float, Meta(
        gt=0, description="client-side rate limit of the key; with `shard`, each of the COUNT replicas keeps to "
        "1/COUNT")] = 2.0
    retries: Annotated[int, Meta(ge=0, description="extra attempts on 429, 5xx, timeouts, connection errors")] = 3


class PollSection(_Section):
    """The schedule every window follows unless its collector or entry says otherwise."""

    interval: Annotated[Duration, Meta(description="default refresh period, at least 1s")] = "5m"
    jitter: Annotated[float, Meta(ge=0, lt=1, description="spread each schedule by up to this share of it")] = 0.1
    delay: Annotated[Duration, Meta(description="end windows this long before now")] = "0s"
    stale_after: Annotated[int, Meta(ge=1, description="intervals without a success before series go")] = 3
    timezone: Annotated[NonEmpty, Meta(description="IANA zone for today and month_to_date")] = "UTC"


class OrgSetEntry(_Section):
    """A named filter on the enterprise: the `org` label."""

    missing: ClassVar[str] = "an org set needs a `name`"

    name: Annotated[NonEmpty, Meta(description="the `org` label value; unique")]
    org_ids: tuple[NonEmpty, ...] | None = None
    user_ids: tuple[NonEmpty, ...] | None = None
    labels: Labels | None = None
    windows: Annotated[Windows, Meta(description="replaces the top-level windows for this set")] | UnsetType = UNSET


_ENABLED: Final = "default: true"
_V3_ONLY: Final = "default: true on API v3; off on v2, where true is an error"
_EACH_SETS_WINDOWS: Final = "default: the top-level windows, or an org set's own"
_POLL_INTERVAL: Final = "default: poll.interval"


class UsageCollector(_Section):
    """Sessions, searches and PRs."""

    enabled: Annotated[bool, Meta(description=_ENABLED)] = True
    interval: Annotated[Duration, Meta(description=_POLL_INTERVAL)] | UnsetType = UNSET
    windows: Annotated[Windows, Meta(description=_EACH_SETS_WINDOWS)] | UnsetType = UNSET


class ActiveUsersCollector(_Section):
    """Active users (API v3 only)."""

    enabled: Annotated[bool, Meta(description=_V3_ONLY)] | UnsetType = UNSET
    interval: Annotated[Duration, Meta(description=_POLL_INTERVAL)] | UnsetType = UNSET
    windows: Annotated[Windows, Meta(description=_EACH_SETS_WINDOWS)] | UnsetType = UNSET
    min_sessions: Annotated[int, Meta(ge=0, description="count a user with at least this many sessions")] = 1
    min_searches: Annotated[int, Meta(ge=0, description="or at least this many searches")] = 1


class ConsumptionCollector(_Section):
    """ACUs consumed."""

    enabled: Annotated[bool, Meta(description=_ENABLED)] = True
    interval: Duration = "30m"
    windows: Annotated[Windows, Meta(description="replaces the windows of every org set")] = (
        DEFAULT_CONSUMPTION_WINDOWS)


class OrganizationsCollector(_Section):
    """Organization names, ACU limits, the billing cycle; discovery's source."""

    enabled: Annotated[bool, Meta(description=_ENABLED)] = True
    interval: Duration = "1h"


class QueueCollector(_Section):
    """The session queue (API v3 only)."""

    enabled: Annotated[bool, Meta(description=_V3_ONLY)] | UnsetType = UNSET
    interval: Duration = "1m"


AnyCollectorSection = (UsageCollector | ActiveUsersCollector | ConsumptionCollector | OrganizationsCollector
                    | QueueCollector)


class CollectorsSection(_Section):
    """One schedule per upstream data set; a null collector keeps its defaults."""

    usage: UsageCollector | None = None
    active_users: ActiveUsersCollector | None = None
    consumption: ConsumptionCollector | None = None
    organizations: OrganizationsCollector | None = None
    queue: QueueCollector | None = None


class DiscoverySection(_Section):
    """One org set per organization the API lists, named by the organization."""

    organizations: Annotated[bool, Meta(description="needs the organizations collector")] = False
    windows: Annotated[Windows, Meta(description="for discovered sets; default: the top-level windows")
                       ] | UnsetType = UNSET
    labels: Annotated[Labels, Meta(description="static labels on discovered sets, which also get org_id")
                      ] | None = None
    exclude: Annotated[tuple[NonEmpty, ...], Meta(description="org ids to skip")] | None = None


class ServerSection(_Section):
    """Where /metrics is served."""

    listen: Annotated[str, Meta(description="HOST:PORT; --listen overrides it")] = "0.0.0.0:9877"
    web_config_file: Annotated[str, Meta(description="TLS / basic auth, exporter-toolkit format")] | None = None
    enable_lifecycle: Annotated[bool, Meta(description="POST /-/reload reloads the config, as SIGHUP does")] = False


class ConfigFile(_Section):
    """The devin-usage-exporter config file (config.example.yaml documents every key)."""

    api: ApiSection | None = None
    poll: PollSection | None = None
    windows: Annotated[Windows, Meta(description="polled for every org set without windows of its own")] = (
        DEFAULT_WINDOWS)
    org_sets: Annotated[tuple[OrgSetEntry, ...], Meta(
        description="at least one, unless discovery.organizations is on")] | None = None
    server: ServerSection | None = None
    shard: Annotated[str, Meta(
        description="INDEX/COUNT or auto/COUNT: poll only this replica's share of the org sets",
        extra={"kind": "shard"},
    )] | None = None
    collectors: CollectorsSection | None = None
    discovery: DiscoverySection | None = None


# --- checking a document ----------------------------------------------------------------------


def convert(document: object, source: str) -> ConfigFile:
    """The document as a ConfigFile; ConfigError with the key path if a key or type is wrong."""
    try:
        return msgspec.convert(document, ConfigFile, strict=True)
    except msgspec.ValidationError as exc:
        message = str(exc)
    root = Node(document, "", source)
    try:
        _explain(message, root)
    except (AssertionError, StopIteration, LookupError):
        # A complaint phrased in a way _explain does not know (a newer msgspec?): msgspec's own words,
        # still one line at the key path.
        match = _MESSAGE_RE.match(message)
        path = (match["path"] or "$") if match else "$"
        Node(None, path.removeprefix("$").removeprefix("."), source).fail(match["problem"] if match else message)


_MESSAGE_RE: Final = re.compile(r"^(?P<problem>.*?)(?: - at (?P<key>`key` in )?`(?P<path>\$[^`]*)`)?$", re.DOTALL)
_STEP_RE: Final = re.compile(r"\.(\w+)|\[(\d+)\]|\[\.\.\.\]")


def _explain(message: str, root: Node) -> NoReturn:
    """Raise msgspec's complaint about the document as our one-line error at the same key path."""
    match = _MESSAGE_RE.match(message)
    assert match is not None  # the pattern matches any text
    problem = match["problem"]
    node, declared, in_labels = _walk(root, match["path"] or "$")
    struct, dict_type = _struct(declared), _dict_type(declared)
    if match["key"]:  # a mapping key of the wrong type
        key = next(k for k in _mapping(node) if not isinstance(k, str))  # keys are strings throughout
        if dict_type is not None and _kind(declared) == "labels":
            node.child(str(key), None).fail(_label_name_problem(key))
        node.fail(f"key {key!r} must be a string")
    if struct is not None and problem.startswith("Object contains unknown field"):
        names = struct.cls.__struct_fields__
        key = next(k for k in _mapping(node) if k not in names)
        near = difflib.get_close_matches(str(key), names, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(names)}"
        node.child(str(key), None).fail(f"unknown key{hint}")
    required = [f.name for f in struct.fields if f.required] if struct is not None else []
    only_a_mapping = all(isinstance(t, mi.StructType) for t in _members(declared))
    if struct is not None and required and (problem.startswith("Object missing required field")
                                            or (node.value is None and only_a_mapping)):
        # A null where only a mapping goes is an empty mapping, which lacks the same keys.
        node.fail(getattr(struct.cls, "missing", "") or f"missing a required key: {', '.join(required)}")
    if problem.startswith("Invalid enum value"):
        if isinstance(node.value, str) and not node.value.strip():
            node.fail("must not be empty")  # as for any other string
        node.fail(f"{node.value!r} {_extra(declared).get('invalid', 'is not one of the choices')}")
    if ", got `" in problem:  # the wrong type altogether
        node.fail(_type_problem(node.value, declared, in_labels))
    node.fail(_bound_problem(node.value, declared) or problem)  # msgspec's words for anything else


def _walk(root: Node, path: str) -> tuple[Node, mi.Type, bool]:
    """The document node at msgspec's `path` and the type declared there (and whether it is a label
    value). A `[...]` step (msgspec's "some value of this dict") goes to the first value that does
    not fit the declared value type."""
    node, declared, in_labels = root, mi.type_info(ConfigFile), False
    for step in _STEP_RE.finditer(path):
        field_name, index = step.group(1), step.group(2)
        in_labels = False
        if field_name is not None:
            struct = _struct(declared)
            assert struct is not None, path
            field = next(f for f in struct.fields if f.encode_name == field_name)
            node, declared = node.child(field_name, _mapping(node).get(field_name)), field.type
        elif index is not None:
            item_type = _item_type(declared)
            assert isinstance(node.value, list) and item_type is not None, path
            node, declared = node.child(int(index), node.value[int(index)]), item_type
        else:
            dict_type = _dict_type(declared)
            assert dict_type is not None, path
            in_labels = _kind(declared) == "labels"
            # Our dicts hold strings (labels): the first value that is not one.
            key, value = next((k, v) for k, v in _mapping(node).items() if not isinstance(v, str))
            node, declared = node.child(str(key), value), dict_type.value_type
    return node, declared, in_labels


def _type_problem(value: object, declared: mi.Type, in_labels: bool) -> str:
    kind = _kind(declared)
    if in_labels:
        return f"label values must be strings, got {describe(value)}; quote it"
    if kind == "duration":
        return f"{value!r} is not a duration like 30s, 5m, 1h30m, 7d (a unit is required)"
    if kind == "window":
        return (f"{value!r} is not a window: use a duration like 24h or 7d, or one of "
                f"{', '.join(CALENDAR_WINDOWS)}")
    if kind == "shard":
        return f"must be INDEX/COUNT or auto/COUNT as a string (for example 0/3), got {describe(value)}"
    if kind == "labels":
        return f"must be a mapping of label name to value, got {describe(value)}"
    members = {type(t) for t in _members(declared)} - {mi.NoneType}
    what = ("a mapping (key: value)" if members & {mi.StructType, mi.DictType}
            else "a list" if members & {mi.ListType, mi.VarTupleType}
            else "an integer" if mi.IntType in members
            else "a number" if mi.FloatType in members
            else "true or false" if mi.BoolType in members
            else "a string")
    return f"must be {what}, got {describe(value)}"


def _bound_problem(value: object, declared: mi.Type) -> str | None:
    """Why a number of the right type is out of its declared range; None if it is not a number."""
    bounds = next((t for t in _members(declared) if isinstance(t, (mi.IntType, mi.FloatType))), None)
    if bounds is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if bounds.ge is not None and value < bounds.ge:
        return f"must be at least {bounds.ge:g}, got {value}"
    if bounds.gt is not None and value <= bounds.gt:
        return f"must be greater than {bounds.gt:g}, got {value}"
    if bounds.lt is not None and value >= bounds.lt:
        return f"must be less than {bounds.lt:g}, got {value}"
    if bounds.le is not None and value > bounds.le:
        return f"must be at most {bounds.le:g}, got {value}"
    return None


def _label_name_problem(name: object) -> str:
    return f"{name!r} is not a valid Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*, no leading __)"


# --- reading the declared types ---------------------------------------------------------------


def _members(declared: mi.Type) -> Iterator[mi.Type]:
    """The alternatives of a type, Metadata and unions unwrapped."""
    if isinstance(declared, mi.Metadata):
        yield from _members(declared.type)
    elif isinstance(declared, mi.UnionType):
        for member in declared.types:
            yield from _members(member)
    else:
        yield declared


def _extra(declared: mi.Type) -> Mapping[str, str]:
    """Our `extra` annotations on a type, the outermost winning."""
    found: dict[str, str] = {}
    while True:
        if isinstance(declared, mi.Metadata):
            found = {**(declared.extra or {}), **found}
            declared = declared.type
        elif isinstance(declared, mi.UnionType):
            for member in declared.types:
                if not isinstance(member, mi.NoneType):
                    found = {**_extra(member), **found}
            return found
        else:
            return found


def _kind(declared: mi.Type) -> str | None:
    return _extra(declared).get("kind")


def _struct(declared: mi.Type) -> mi.StructType | None:
    return next((t for t in _members(declared) if isinstance(t, mi.StructType)), None)


def _dict_type(declared: mi.Type) -> mi.DictType | None:
    return next((t for t in _members(declared) if isinstance(t, mi.DictType)), None)


def _item_type(declared: mi.Type) -> mi.Type | None:
    return next((t.item_type for t in _members(declared) if isinstance(t, (mi.ListType, mi.VarTupleType))), None)


def _mapping(node: Node) -> Mapping[object, object]:
    return node.value if isinstance(node.value, dict) else {}


# --- the JSON Schema --------------------------------------------------------------------------


def json_schema() -> dict[str, object]:
    """The JSON Schema of the config file, for editors (`# yaml-language-server: $schema=...`)."""
    generated = msgspec.json.schema(ConfigFile)
    definitions = generated["$defs"]
    root = definitions.pop("ConfigFile")
    return {"$schema": SCHEMA_ID, **root, "title": "devin-usage-exporter config", "$defs": definitions}


def main() -> int:
    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
