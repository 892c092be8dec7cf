"""Immutable poll state: the last outcome of every schedule (collector x org set x window), swapped whole."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final, TypeVar

from exporter.catalogue.declare import Point
from exporter.config import Config

K = TypeVar("K")
V = TypeVar("V")

# The results of enterprise-level collectors (organizations, queue) sit under this org set name,
# which no org set can have (names are non-empty).
ENTERPRISE: Final = ""
# Inside an org set: (collector, window name); enterprise collectors have no window.
Slot = tuple[str, str | None]


def _copy(mapping: Mapping[K, V]) -> dict[K, V]:
    # dict(proxy) goes through the Mapping protocol key by key; proxy.copy() copies the dict
    # underneath in C, about 10x faster.
    return mapping.copy() if isinstance(mapping, MappingProxyType) else dict(mapping)


@dataclass(frozen=True)
class Result:
    """What the poller knows about one schedule."""

    points: tuple[Point, ...] | None = None  # last good reply's points
    last_success: float | None = None  # unix time of the last good reply
    last_attempt: float | None = None  # unix time the latest poll finished
    ok: bool = False  # the latest poll succeeded
    error: str | None = None  # reason of the latest failure, None after a success

    def succeeded(self, points: Iterable[Point], now: float) -> Result:
        return Result(points=tuple(points), last_success=now, last_attempt=now, ok=True, error=None)

    def failed(self, reason: str, now: float) -> Result:
        return replace(self, last_attempt=now, ok=False, error=reason)


_EMPTY: Final[Mapping[Slot, Result]] = MappingProxyType({})
_NEVER: Final = Result()
_NONE: Final[AbstractSet[Slot]] = frozenset()


@dataclass(frozen=True)
class Snapshot:
    """The config in force and the latest result per schedule; never mutated."""

    config: Config
    # org set name (ENTERPRISE for enterprise collectors) -> slot -> result; nested so one update
    # copies O(sets + slots), and a cached rendering of an org set is valid while its map is.
    results: Mapping[str, Mapping[Slot, Result]] = field(default_factory=dict)

    @classmethod
    def empty(cls, config: Config) -> Snapshot:
        return cls(config).with_config(config, {})

    def result(self, org_set: str, collector: str, window: str | None) -> Result:
        return self.results.get(org_set, _EMPTY).get((collector, window)) or _NEVER

    def of(self, org_set: str) -> Mapping[Slot, Result]:
        return self.results.get(org_set, _EMPTY)

    def with_result(self, org_set: str, slot: Slot, result: Result) -> Snapshot:
        if org_set not in self.results:
            return self  # a reply for a set removed by a reload while it was in flight
        inner = _copy(self.results[org_set])
        inner[slot] = result
        outer = _copy(self.results)  # O(org sets) per poll result, but a C-level copy: ~5 us at 1000 sets
        outer[org_set] = MappingProxyType(inner)
        return Snapshot(self.config, MappingProxyType(outer))

    def with_config(self, config: Config, kept: Mapping[str, AbstractSet[Slot]]) -> Snapshot:
        """The snapshot under a new config, keeping only the results of the slots `kept` names per org set."""
        outer: dict[str, Mapping[Slot, Result]] = {}
        for name in (ENTERPRISE, *(s.name for s in config.org_sets)):
            old = self.results.get(name, _EMPTY)
            slots = kept.get(name, _NONE)
            if isinstance(old, MappingProxyType) and old.keys() <= slots:
                # Kept whole: the same object, so that what was rendered from it stays valid for
                # the new config's snapshot too (see Exposition.prepare), as after a poll result.
                # (One set comparison in C per org set: a reload at 1,000 does this on the event loop.)
                outer[name] = old
            else:
                outer[name] = MappingProxyType({slot: r for slot, r in old.items() if slot in slots})
        return Snapshot(config, MappingProxyType(outer))
