"""The shapes the catalogue is written in: a family, a point, an endpoint, a collector.

An *endpoint* says everything about one upstream path: its version, how time bounds and the org
set's filters are sent, whether it is asked once per organization or user, its paging, how a reply
is read (the schema) and how the reply becomes points. A *collector* (SPEC §10) is a named group of
endpoint calls per API version with the families they feed. Nothing outside exporter/catalogue
and the simulator names an upstream path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Generic, Literal, Protocol, TypeVar
from urllib.parse import quote

from exporter.config import OrgSet
from exporter.transport import Request

Version = Literal["v2", "v3"]
Bounds = Literal["rfc3339", "unix", "none"]
Paging = Literal["cursor", "skip_limit"]
Scope = Literal["org_set", "enterprise"]
Filter = Literal["org_ids", "user_ids"]
FILTERS: Final[tuple[Filter, ...]] = ("org_ids", "user_ids")

R = TypeVar("R")


class Filtered(Protocol):
    """What an endpoint needs to know of an org set to tell whether it can answer for it."""

    @property
    def org_ids(self) -> tuple[str, ...]: ...
    @property
    def user_ids(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class Family:
    """One gauge family: its name, HELP text and the labels its points carry themselves (the org
    set's `org`, `window` and static labels are added by the scope)."""

    name: str
    help: str
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Derived:
    """A per-org-set family computed from an enterprise-level collector's points and the set's
    filters (an org set's ACU limit from its organizations' limits); None publishes nothing.
    `of(points)` reads the points once and gives the value for each org set: asked per org set,
    reading 1,000 organizations' points for each of 1,000 org sets took a second."""

    family: Family
    of: Callable[[Sequence[Point]], Callable[[OrgSet], float | None]]


@dataclass(frozen=True, slots=True)  # slots: at 1,000 org sets the snapshot holds ~100,000 of them
class Point:
    """One value a reply gave, before it is a sample: family, own labels, value."""

    family: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


@functools.lru_cache(maxsize=4096)
def one_label(name: str, value: str) -> tuple[tuple[str, str], ...]:
    """`((name, value),)` as one shared object per pair: every org set's and window's reply names
    the same origins, sizes and products, and one copy of each instead of one per reply saves
    megabytes of the snapshot at 1,000 org sets."""
    return ((name, value),)


@dataclass(frozen=True)
class Query:
    """What one schedule asks at one moment: the org set's filters, the window's bounds (None, None:
    send none) and the collector's own parameters."""

    org_ids: tuple[str, ...] = ()
    user_ids: tuple[str, ...] = ()
    start: datetime | None = None
    end: datetime | None = None
    options: tuple[tuple[str, str], ...] = ()  # e.g. ("min_sessions", "1"), for endpoints that take them


def format_rfc3339(dt: datetime) -> str:
    """`2026-11-24T18:00:00Z`: UTC, whole seconds (truncated), the form FastAPI/pydantic accept."""
    if dt.tzinfo is None or dt.utcoffset() is None:
        # A naive datetime is ambiguous; guessing would shift every window by the host's offset.
        raise ValueError("format_rfc3339 needs a timezone-aware datetime")
    utc = dt.astimezone(UTC).replace(microsecond=0, tzinfo=None)
    return utc.isoformat() + "Z"


def format_unix_rfc3339(at: float) -> str:
    """A Unix time as format_rfc3339 writes it, for messages that name a moment."""
    return format_rfc3339(datetime.fromtimestamp(at, tz=UTC))


def unix_bounds(start: datetime, end: datetime) -> tuple[int, int]:
    """(time_after, time_before): each bound cut to its whole Unix second. A trailing window of whole
    seconds stays exactly its length apart; a start on a whole second (a billing cycle's, a
    midnight) is sent as it is, never a second early."""
    return math.floor(start.timestamp()), math.floor(end.timestamp())


@dataclass(frozen=True)
class Endpoint(Generic[R]):
    """One upstream path. `read` checks a reply (for a paged endpoint: one list item) against the
    endpoint's schema; `points` turns every reply of one poll (one per request, or every item of
    every page) into points, each of a family named in `families`."""

    path: str  # "{id}" stands for the organization or user of a `per` endpoint
    version: Version
    read: Callable[[object], R]
    points: Callable[[Sequence[R], Query], Iterable[Point]]
    families: tuple[str, ...]
    bounds: Bounds = "none"
    filters: frozenset[Filter] = frozenset()  # the set's filters it takes, sent as repeated keys
    per: Filter | None = None  # asked once per id of this filter (in the path); points are summed
    paging: Paging | None = None
    options: bool = False  # sends the query's options (active users' thresholds)

    def takes(self, org_set: Filtered | None) -> bool:
        """The endpoint can answer for the set exactly: it takes every filter the set has."""
        if org_set is None:
            return True
        used = {f for f in FILTERS if getattr(org_set, f)}
        if self.per is not None and self.per not in used:
            return False
        return used <= (self.filters | ({self.per} if self.per else set()))

    def requests(self, query: Query, *, org_set: str | None, collector: str,
                 permission: str | None) -> list[Request]:
        """The GETs one poll makes (several for a `per` endpoint), without paging parameters."""
        params: list[tuple[str, str]] = []
        if self.bounds == "rfc3339":
            params += [(name, format_rfc3339(t)) for name, t in (("start_date", query.start), ("end_date", query.end))
                       if t is not None]
        elif self.bounds == "unix" and query.start is not None and query.end is not None:
            after, before = unix_bounds(query.start, query.end)
            params += [("time_after", str(after)), ("time_before", str(before))]
        for name in FILTERS:
            if name in self.filters:
                params.extend((name, value) for value in getattr(query, name))
        if self.options:
            params.extend(query.options)
        ids = getattr(query, self.per) if self.per is not None else (None,)
        # One path segment per id: a `?`, `#` or `/` in it must not ask another resource.
        return [Request(self.path.replace("{id}", quote(ident, safe="")) if ident is not None else self.path,
                        tuple(params), org_set, collector, permission)
                for ident in dict.fromkeys(ids)]  # an id listed twice counts once


# A collector holds endpoints of different reply types; each endpoint's read and points agree on
# its own type, which is all the type parameter is for.
AnyEndpoint = Endpoint[Any]


@dataclass(frozen=True)
class Collector:
    """A data set of SPEC §10 with its own schedule: per API version, the calls one poll makes (each
    call a list of alternative endpoints: the first that takes the org set is asked; none: the
    call's families are not published for that set)."""

    name: str
    scope: Scope
    families: tuple[Family, ...]
    calls: Mapping[Version, tuple[tuple[AnyEndpoint, ...], ...]]
    permission: str  # the v3 permission its endpoints need (named on a 403 and in the README)
    windowed: bool = True
    # Versions on which the billing_cycle window sends the current cycle's bounds; elsewhere it
    # sends none and the API defaults to the current cycle (v2 usage, SPEC §4).
    cycle_bounds: frozenset[Version] = frozenset({"v3"})
    extra_prefix: str | None = None  # undeclared `<prefix><field>` families are allowed (v2 usage extras)
    derived: tuple[Derived, ...] = ()  # enterprise collectors: families per org set, from their points
    options: tuple[str, ...] = ()  # collector settings sent as query parameters (min_sessions, …)
    by_name: Mapping[str, Family] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {f.name: f for f in self.families})
        for version, calls in self.calls.items():
            for endpoint in (e for call in calls for e in call):
                assert endpoint.version == version, f"{endpoint.path} declared under {version}"
                unknown = set(endpoint.families) - set(self.by_name)
                assert not unknown, f"{endpoint.path} feeds undeclared families {unknown}"

    def plan(self, version: Version, org_set: Filtered | None) -> tuple[AnyEndpoint, ...]:
        """The endpoint each call asks for this set, leaving out calls that cannot answer for it."""
        chosen = []
        for call in self.calls.get(version, ()):
            endpoint = next((e for e in call if e.takes(org_set)), None)
            if endpoint is not None:
                chosen.append(endpoint)
        return tuple(chosen)

    def unpublished(self, version: Version, org_set: Filtered) -> tuple[str, ...]:
        """The families this set does not get because no endpoint can answer for its filters."""
        planned = {name for endpoint in self.plan(version, org_set) for name in endpoint.families}
        offered = {name for call in self.calls.get(version, ()) for e in call for name in e.families}
        return tuple(f.name for f in self.families if f.name in offered - planned)

    def check(self, points: Iterable[Point]) -> None:
        """Every point belongs to a declared family, with exactly that family's labels: a mismatch is
        a bug in a declaration and must be loud, never a silently dropped series."""
        for point in points:
            family = self.by_name.get(point.family)
            if family is None:
                if self.extra_prefix is not None and point.family.startswith(self.extra_prefix) and not point.labels:
                    continue
                raise DeclarationError(f"collector {self.name}: point of undeclared family {point.family}")
            if tuple(name for name, _ in point.labels) != family.labels:
                raise DeclarationError(f"collector {self.name}: point of {family.name} has labels "
                                       f"{[n for n, _ in point.labels]}, declared {list(family.labels)}")


class DeclarationError(AssertionError):
    """A point that does not fit its declaration: a bug in the catalogue, not in the reply."""


def sum_points(points: Iterable[Point]) -> tuple[Point, ...]:
    """Points of the same family and labels added up, in first-seen order (per-organization and
    per-user replies of one org set)."""
    totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for point in points:
        key = (point.family, point.labels)
        totals[key] = totals.get(key, 0.0) + point.value
    return tuple(Point(name, value, labels) for (name, labels), value in totals.items())
