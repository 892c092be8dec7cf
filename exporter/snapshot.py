"""Immutable poll state: the last outcome of every (org set, window), swapped whole on each change."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TypeVar

from exporter.config import Config, OrgSet, Window

_EMPTY: Mapping[str, WindowResult] = MappingProxyType({})
K = TypeVar("K")
V = TypeVar("V")


def _copy(mapping: Mapping[K, V]) -> dict[K, V]:
    # dict(proxy) goes through the Mapping protocol key by key; proxy.copy() copies the dict
    # underneath in C, about 10x faster.
    return mapping.copy() if isinstance(mapping, MappingProxyType) else dict(mapping)


@dataclass(frozen=True)
class WindowResult:
    """What the poller knows about one window of one org set."""

    values: Mapping[str, float] | None = None  # last good reply, by API field name
    last_success: float | None = None  # unix time of the last good reply
    last_attempt: float | None = None  # unix time the latest poll finished
    ok: bool = False  # the latest poll succeeded
    error: str | None = None  # reason of the latest failure, None after a success

    def succeeded(self, values: Mapping[str, float], now: float) -> WindowResult:
        return WindowResult(values=MappingProxyType(dict(values)), last_success=now,
                            last_attempt=now, ok=True, error=None)

    def failed(self, reason: str, now: float) -> WindowResult:
        return replace(self, last_attempt=now, ok=False, error=reason)


@dataclass(frozen=True)
class Snapshot:
    """The config in force and the latest result per org set and window; never mutated."""

    config: Config
    # org set name -> window name -> result; nested so one update copies O(sets + windows).
    results: Mapping[str, Mapping[str, WindowResult]] = field(default_factory=dict)

    @classmethod
    def empty(cls, config: Config) -> Snapshot:
        return cls(config).with_config(config, set())

    def result(self, org_set: str, window: str) -> WindowResult:
        return self.results.get(org_set, _EMPTY).get(window) or WindowResult()

    def with_result(self, org_set: str, window: str, result: WindowResult) -> Snapshot:
        if org_set not in self.results:
            return self  # a reply for a set removed by a reload while it was in flight
        inner = _copy(self.results.get(org_set, _EMPTY))
        inner[window] = result
        outer = _copy(self.results)  # O(org sets) per poll result, but a C-level copy: ~5 us at 1000 sets
        outer[org_set] = MappingProxyType(inner)
        return Snapshot(self.config, MappingProxyType(outer))

    def with_config(self, config: Config, kept: set[tuple[str, str]]) -> Snapshot:
        """The snapshot under a new config, keeping only the results of the `kept` schedules."""
        outer: dict[str, Mapping[str, WindowResult]] = {}
        for org_set in config.org_sets:
            inner = {w.name: self.result(org_set.name, w.name)
                     for w in org_set.windows if (org_set.name, w.name) in kept}
            outer[org_set.name] = MappingProxyType(inner)
        return Snapshot(config, MappingProxyType(outer))

    def schedules(self) -> list[tuple[OrgSet, Window]]:
        return [(s, w) for s in self.config.org_sets for w in s.windows]

    def up(self, org_set: OrgSet) -> bool:
        """1 for `devin_up`: the latest poll of every window of the set succeeded."""
        return all(self.result(org_set.name, w.name).ok for w in org_set.windows)

    def attempted(self, org_set: OrgSet) -> bool:
        return any(self.result(org_set.name, w.name).last_attempt is not None for w in org_set.windows)

    def ready(self) -> bool:
        """Every org set has had at least one finished poll attempt."""
        return all(self.attempted(s) for s in self.config.org_sets)
