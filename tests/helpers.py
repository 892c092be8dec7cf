"""Shared test helpers: a fake wall clock, configs, exposition parsing, `python -m exporter` children."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, TypedDict, Unpack

from prometheus_client.parser import text_string_to_metric_families

from exporter.config import Config, OrgSet, Window, parse_config
from exporter.snapshot import Snapshot

ROOT: Final = Path(__file__).resolve().parent.parent
# Recognisable, so a leak into /metrics, the landing page or a log is easy to grep for.
KEY: Final = "apk_user_DAEMONLEAK_123456789"
T0: Final = datetime(2026, 11, 24, 18, 0, 0, tzinfo=UTC)

# API field -> metric name (SPEC §5).
USAGE_METRICS: Final = {
    "sessions_count": "devin_usage_sessions",
    "searches_count": "devin_usage_searches",
    "prs_opened": "devin_usage_prs_opened",
    "prs_closed": "devin_usage_prs_closed",
    "prs_merged": "devin_usage_prs_merged",
}

Labels = frozenset[tuple[str, str]]


@dataclass
class WallClock:
    """One mutable wall time shared by the simulator (datetime) and the exporter (unix seconds)."""

    now: datetime = T0

    def time(self) -> float:
        return self.now.timestamp()

    def datetime(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class ConfigOptions(TypedDict, total=False):
    """The keyword arguments of `config_text` and `make_config`."""

    windows: str
    interval: str
    delay: str
    stale_after: int
    zone: str
    retries: int
    timeout: str
    key: str
    collectors: str
    extra: str  # more top-level YAML (`discovery: …`)
    server: str  # more keys of the server section (`enable_lifecycle: true`)


_CONFIG_DEFAULTS: Final[ConfigOptions] = {
    "windows": "[1h, 24h]",
    "interval": "1h",
    "delay": "0s",
    "stale_after": 3,
    "zone": "UTC",
    "retries": 0,
    "timeout": "5s",
    "key": KEY,
    # Only the usage collector (active_users and queue are off on v2): release 0.1's tests count its
    # requests and schedules; tests of the other collectors pass `collectors`.
    "collectors": "{organizations: {enabled: false}, consumption: {enabled: false}}",
    "extra": "",
    "server": "",
}


def config_text(base_url: str, org_sets: str, **options: Unpack[ConfigOptions]) -> str:
    """The YAML of `make_config`, for tests that need a config file (a reload reads one)."""
    o = {**_CONFIG_DEFAULTS, **options}
    return f"""\
api:
  base_url: {base_url}
  api_key: {o["key"]}
  timeout: {o["timeout"]}
  retries: {o["retries"]}
  max_concurrency: 32
  max_requests_per_second: 10000
poll:
  interval: {o["interval"]}
  jitter: 0
  delay: {o["delay"]}
  stale_after: {o["stale_after"]}
  timezone: {o["zone"]}
windows: {o["windows"]}
collectors: {o["collectors"]}
org_sets:
{textwrap.indent(textwrap.dedent(org_sets).strip(), "  ")}
server:
  listen: 127.0.0.1:0
{textwrap.indent(textwrap.dedent(str(o["server"])).strip(), "  ")}
{textwrap.dedent(str(o["extra"])).strip()}
"""


def make_config(base_url: str, org_sets: str, **options: Unpack[ConfigOptions]) -> Config:
    """A config that polls every schedule exactly once, right away (no jitter, long interval).

    Only the usage collector by default: release 0.1's tests count its requests and schedules;
    tests of the other collectors pass `collectors` (`"{}"`: every collector at its defaults).
    """
    return parse_config(config_text(base_url, org_sets, **options), "test.yaml", env={})


def parse_samples(text: str) -> dict[str, dict[Labels, float]]:
    """Exposition text -> sample name -> labels -> value (counters keep their `_total` names)."""
    out: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return out


def family_types(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def labels(**kw: str) -> Labels:
    return frozenset(kw.items())


async def wait_until(
    predicate: Callable[[], object], *, within: float = 5.0, what: str = "condition"
) -> None:
    """Poll `predicate` every 20 ms until it is truthy; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


def query_key(query: Mapping[str, list[str]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A hashable, order-insensitive form of a recorded query string."""
    return tuple(sorted((k, tuple(v)) for k, v in query.items()))


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment for a child, minus the exporter's own variables, importing this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("DEVIN_API_KEY", "DEVIN_EXPORTER_CONFIG")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m exporter ...` run to completion, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        env=env or subprocess_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class ExporterProcess:
    """`python -m exporter ...` as a child; stdout/stderr lines collected by threads so reads never block.

    `lines` and the condition `_cond` (notified on every line and at each stream's end) are what
    subclasses wait on.
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = [sys.executable, "-m", "exporter", *args]
        self.popen = subprocess.Popen(
            self.args,
            cwd=ROOT,
            env=env or subprocess_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._cond = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(name, stream), daemon=True)
            for name, stream in (("stdout", self.popen.stdout), ("stderr", self.popen.stderr))
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, name: str, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._cond:
                self.lines[name].append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _join_readers(self) -> None:
        for reader in self._readers:
            reader.join(timeout=2)


def usage_schedules(snapshot: Snapshot) -> list[tuple[OrgSet, Window]]:
    """Every (org set, window) of the usage collector: release 0.1's schedules."""
    return [(s, w) for s in snapshot.config.org_sets for w in s.windows]
