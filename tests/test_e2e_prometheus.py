"""End to end with the real Prometheus server: simulator -> exporter -> Prometheus -> rules and dashboard.

Three real processes over loopback sockets: the API simulator (`python -m exporter simulate`), the
exporter (`python -m exporter --config ...`) polling it every 2 s, and `prometheus` scraping the
exporter every second and evaluating the shipped `prometheus-rules.yaml` every second. Through
Prometheus' HTTP API the tests check that the scraped series are what the exporter served and the
numbers the API returned, that every shipped rule evaluates cleanly, that every query of the
shipped Grafana dashboard parses and returns data, and that a failing API puts `DevinExporterDown`
in pending.

The module runs two such stacks, one after the other (the `stack` fixture is parametrised; pytest
finishes every test of one before it starts the other): `v2`, release 0.1's setup (an `apk_user_`
key, the usage collector only, three configured org sets), and `v3` (a `cog_` token, every
collector of the catalogue, organization discovery beside four configured sets).

Everything waits by polling with a deadline; nothing sleeps a fixed time to let something happen.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import pytest
import yaml
from e2e_support import (
    DASHBOARD_FILE,
    RULES_FILE,
    Processes,
    PromAPI,
    free_port,
    http_get,
    http_json,
    iter_dicts,
    iter_panels,
    parse_label_values,
    python_argv,
    python_env,
    read_line,
    substitute,
    variable_query,
    wait_until,
)
from helpers import USAGE_METRICS
from prometheus_client.parser import text_string_to_metric_families

from exporter.catalogue import CATALOGUE, all_families
from exporter.catalogue.declare import Version
from exporter.simulator import (
    DEFAULT_DEMO_KEY,
    DEFAULT_ORGANIZATIONS,
    USAGE_PATH,
    billing_cycle,
    expected_active_users,
    expected_consumption_v3,
    expected_prs,
    expected_queue,
    expected_searches,
    expected_sessions,
    expected_usage,
    parse_datetime,
)
from exporter.simulator.v3 import PRS_PATH, SEARCHES_PATH, SESSIONS_PATH

# The v3 paths of SPEC §10 the cost, adoption and queue collectors call, written out here.
CONSUMPTION_PATH: Final = "/v3/enterprise/consumption/daily"
ORG_CONSUMPTION_PATH: Final = CONSUMPTION_PATH + "/organizations/"
ACTIVE_USERS_PATH: Final = "/v3/enterprise/metrics/active-users"
QUEUE_PATH: Final = "/v3/enterprise/queue"

PROMETHEUS: Final = shutil.which("prometheus")

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="the Prometheus server binary `prometheus` is not on PATH "
    "(Debian package `prometheus`; scripts/test installs it when run as root)",
)

JOB: Final = "devin-usage-exporter"
POLL_INTERVAL: Final = 2.0  # seconds; the exporter's poll.interval below
WINDOW_SECONDS: Final = {"1h": 3600, "24h": 86400, "7d": 7 * 86400}
# Values for the dashboard's Grafana variables. `$org` / `$window` are only used with `=~`, and
# the variables' "All" value is `.+`. Scrapes are 1 s apart, so a 30 s rate window always holds
# enough samples (Grafana's $__rate_interval is at least 4 scrape intervals).
DASHBOARD_VARIABLES: Final = {
    "org": ".+",
    "window": ".+",
    "__rate_interval": "30s",
    "__interval": "5s",
    "__interval_ms": "5000",
    "__range": "1m",
    "__range_s": "60",
    "__range_ms": "60000",
}


@dataclass(frozen=True)
class OrgSetSpec:
    org_ids: tuple[str, ...] = ()
    user_ids: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    windows: tuple[str, ...] = ("1h", "24h", "7d")


@dataclass(frozen=True)
class StackProfile:
    """What one stack runs and what its exporter must then publish."""

    version: Version  # also the stack's pytest id
    config: str  # the exporter's config; {base_url}, {key} and {collectors} are filled in
    api_key: str
    simulator_args: tuple[str, ...]
    org_sets: Mapping[str, OrgSetSpec]  # every org set the exporter polls, discovered ones included
    collectors: tuple[str, ...]  # the collectors the config enables
    consumption_windows: tuple[str, ...] = ()  # collectors.consumption.windows: every set's, replacing its own

    @property
    def series_keys(self) -> frozenset[tuple[str, str]]:
        return frozenset((org, window) for org, spec in self.org_sets.items() for window in spec.windows)

    @property
    def windows(self) -> set[str]:
        return {window for spec in self.org_sets.values() for window in spec.windows}

    def usage_keys(self, metric: str) -> frozenset[tuple[str, str]]:
        """(org set, window) of every series of a usage family; v3 searches take no user_ids (SPEC §10)."""
        return frozenset((org, window) for org, window in self.series_keys
                         if not (self.version == "v3" and metric == "devin_usage_searches"
                                 and self.org_sets[org].user_ids))

    def polls(self, collector: str, org: str) -> bool:
        """Whether `collector` has schedules for org set `org` (README: What is not published, and why):
        the active-users endpoint takes no user_ids, and no consumption endpoint takes org_ids and
        user_ids together; such a set gets no schedule, so no devin_collector_up either."""
        spec = self.org_sets[org]
        if collector == "active_users":
            return not spec.user_ids
        if collector == "consumption":
            return not (spec.org_ids and spec.user_ids)
        return True

    def keys_of(self, collector: str) -> frozenset[tuple[str, str]]:
        """(org set, window) of every series of a per-window collector the stack enables."""
        if collector not in self.collectors:
            return frozenset()
        return frozenset(
            (org, window) for org, spec in self.org_sets.items() if self.polls(collector, org)
            for window in (self.consumption_windows if collector == "consumption" else spec.windows))

    def collector_keys(self) -> set[tuple[str, str | None]]:
        """(collector, org set) of every devin_collector_up series; enterprise-level ones have no org set."""
        keys: set[tuple[str, str | None]] = set()
        for collector in CATALOGUE:
            if collector.name in self.collectors:
                owners = [None] if collector.scope == "enterprise" else [
                    org for org in self.org_sets if self.polls(collector.name, org)]
                keys |= {(collector.name, owner) for owner in owners}
        return keys

    def enterprise_collectors(self) -> set[str]:
        """The enabled collectors without an org set (organizations, queue)."""
        return {c.name for c in CATALOGUE if c.name in self.collectors and c.scope == "enterprise"}

    def unpublished(self) -> frozenset[str]:
        """Families of the catalogue this stack's exporter cannot publish: those of collectors it does
        not enable, and those its API version has no source for."""
        published: set[str] = set()
        for collector in CATALOGUE:
            if collector.name in self.collectors:
                calls = collector.calls.get(self.version, ())
                published |= {name for call in calls for endpoint in call for name in endpoint.families}
                published |= {derived.family.name for derived in collector.derived}
        return frozenset(f.name for f in all_families()) - published


# --- v2: release 0.1's stack ---------------------------------------------------------------------

ORG_SETS: Final = {
    "enterprise": OrgSetSpec(),
    "platform": OrgSetSpec(org_ids=("org-123", "org-456"), labels={"team": "platform"}),
    "mobile-oncall": OrgSetSpec(org_ids=("org-789",), user_ids=("user-1", "user-2"),
                                labels={"team": "mobile"}, windows=("24h", "7d")),
}
SERIES_KEYS: Final = frozenset((org, window) for org, spec in ORG_SETS.items() for window in spec.windows)

EXPORTER_CONFIG: Final = """\
api:
  base_url: {base_url}
  api_key: {key}
  timeout: 2s
  retries: 0
  max_concurrency: 8
  max_requests_per_second: 100   # the default of 2/s would throttle 8 windows every 2 s
poll:
  interval: 2s
  jitter: 0
  stale_after: 3
windows: [1h, 24h, 7d]
collectors:
  consumption: {{enabled: false}}
  organizations: {{enabled: false}}  # release 0.1's schedules; the v3 stack below polls every collector
org_sets:
  - name: enterprise
  - name: platform
    org_ids: [org-123, org-456]
    labels: {{team: platform}}
  - name: mobile-oncall
    org_ids: [org-789]
    user_ids: [user-1, user-2]
    labels: {{team: mobile}}
    windows: [24h, 7d]
server:
  listen: 127.0.0.1:9877         # replaced by --listen
"""

# --- v3: a service user's token, every collector, discovery ------------------------------------

V3_TOKEN: Final = "cog_e2e_service_user"
# The set discovery makes of each of the simulator's default organizations: named by the
# organization, except where a configured set has that name ("Payments" below).
DISCOVERED: Final = {
    "Platform": "org-platform-1",
    "Platform Data": "org-platform-2",
    "Mobile": "org-mobile",
    "Payments (org-123)": "org-123",
    "Growth": "org-456",
    "Support Tools": "org-789",
}
V3_ORG_SETS: Final = {
    "enterprise": OrgSetSpec(),
    "platform": OrgSetSpec(org_ids=("org-platform-1", "org-platform-2"), labels={"team": "platform"}),
    "mobile-oncall": OrgSetSpec(org_ids=("org-mobile",), user_ids=("user-1", "user-2"),
                                labels={"team": "mobile"}, windows=("24h", "billing_cycle")),
    "Payments": OrgSetSpec(org_ids=("org-123", "org-456"), labels={"team": "payments"}, windows=("7d",)),
    **{name: OrgSetSpec(org_ids=(org_id,), labels={"org_id": org_id, "source": "discovery"}, windows=("24h",))
       for name, org_id in DISCOVERED.items()},
}

# Every collector of SPEC §10 on the usage collector's 2 s schedule, so the cost, adoption and
# queue panels and rules have data within seconds. Consumption polls its own windows for every set
# (replacing the sets' lists): a calendar one, one usage also polls (7d: ACUs per merged PR), and
# the cycle's (the budget rules); 30d would only add requests.
V3_ENABLED: Final = tuple(c.name for c in CATALOGUE)
V3_CONSUMPTION_WINDOWS: Final = ("today", "7d", "billing_cycle")
V3_COLLECTORS: Final = "\n".join(
    f"  {c.name}: {{enabled: {str(c.name in V3_ENABLED).lower()}, interval: 2s"
    + (f", windows: [{', '.join(V3_CONSUMPTION_WINDOWS)}]" if c.name == "consumption" else "") + "}"
    for c in CATALOGUE)
V3_EXPORTER_CONFIG: Final = """\
api:
  base_url: {base_url}
  api_key: {key}                 # a cog_ token: api.version auto picks v3
  timeout: 2s
  retries: 0
  max_concurrency: 8
  max_requests_per_second: 100   # ~50 calls/s: usage is three calls per window, consumption one per org
poll:
  interval: 2s
  jitter: 0
  stale_after: 3
windows: [1h, 24h, 7d]
collectors:
{collectors}
discovery:
  organizations: true
  windows: [24h]
  labels: {{source: discovery}}
org_sets:
  - name: enterprise
  - name: platform
    org_ids: [org-platform-1, org-platform-2]
    labels: {{team: platform}}
  - name: mobile-oncall
    org_ids: [org-mobile]
    user_ids: [user-1, user-2]   # v3 searches take no user_ids: no devin_usage_searches for this set
    labels: {{team: mobile}}
    windows: [24h, billing_cycle]
  - name: Payments               # also an organization's name: discovery calls that one "Payments (org-123)"
    org_ids: [org-123, org-456]
    labels: {{team: payments}}
    windows: [7d]
server:
  listen: 127.0.0.1:9877         # replaced by --listen
"""

PROFILES: Final = {
    "v2": StackProfile("v2", EXPORTER_CONFIG, DEFAULT_DEMO_KEY, (), ORG_SETS, ("usage",)),
    "v3": StackProfile("v3", V3_EXPORTER_CONFIG, V3_TOKEN, ("--v3-token", V3_TOKEN), V3_ORG_SETS,
                       V3_ENABLED, V3_CONSUMPTION_WINDOWS),
}
# A test of one stack only; the module-scoped fixture is still shared with the other tests of that stack.
V2_ONLY: Final = pytest.mark.parametrize("stack", ["v2"], indirect=True)
V3_ONLY: Final = pytest.mark.parametrize("stack", ["v3"], indirect=True)


@dataclass
class Stack:
    simulator_url: str
    exporter_url: str
    prom: PromAPI
    processes: Processes
    profile: StackProfile
    faulted: bool = False  # set once the fault cycle ran: error counters and alerts are then expected

    @property
    def instance(self) -> str:
        return self.exporter_url.removeprefix("http://")

    def exporter_metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        status, body = http_get(self.exporter_url + "/metrics")
        assert status == 200
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
        return samples


@pytest.fixture(scope="module", params=list(PROFILES))
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    processes = Processes()
    tmp = Path(tempfile.mkdtemp(prefix=f"devin-e2e-{request.param}-"))
    try:
        yield _start(processes, tmp, PROFILES[request.param])
    finally:
        processes.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def _start(processes: Processes, tmp: Path, profile: StackProfile) -> Stack:
    env = python_env()

    # 1. The simulator, on a port it picks itself.
    simulator = processes.start(
        "simulator",
        python_argv("-m", "exporter", "simulate", "--listen", "127.0.0.1:0", *profile.simulator_args), tmp,
        capture_stdout=True, env=env)
    line = read_line(simulator, time.monotonic() + 15)
    match = re.fullmatch(r"simulator listening on (http://127\.0\.0\.1:\d+)\n", line)
    assert match is not None, line
    simulator_url = match.group(1)

    # 2. The exporter, polling it every 2 s.
    config_file = tmp / "exporter.yaml"
    config_file.write_text(profile.config.format(base_url=simulator_url, key=profile.api_key,
                                                 collectors=V3_COLLECTORS))
    exporter_address = f"127.0.0.1:{free_port()}"
    processes.start(
        "exporter",
        python_argv("-m", "exporter", "--config", str(config_file), "--listen", exporter_address,
                    "--log-level", "debug"),
        tmp, env=env)
    exporter_url = f"http://{exporter_address}"
    wait_until("the exporter's /readyz to answer 200",
               lambda: http_get(exporter_url + "/readyz", timeout=1)[0] == 200,
               timeout=20, processes=processes)

    # 3. Prometheus: 1 s scrapes and rule evaluations, the shipped rules file loaded as is.
    prometheus_config = tmp / "prometheus.yml"
    prometheus_config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES_FILE.resolve())],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [exporter_address]}]}],
    }))
    prometheus_address = f"127.0.0.1:{free_port()}"
    assert PROMETHEUS is not None
    processes.start(
        "prometheus",
        [PROMETHEUS, f"--config.file={prometheus_config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address={prometheus_address}", "--storage.tsdb.retention.time=1h",
         "--log.level=warn"],
        tmp)
    prometheus_url = f"http://{prometheus_address}"
    wait_until("Prometheus' /-/ready to answer 200",
               lambda: http_get(prometheus_url + "/-/ready", timeout=1)[0] == 200,
               timeout=30, processes=processes)
    return Stack(simulator_url, exporter_url, PromAPI(prometheus_url), processes, profile)


def _by_org_window(result: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    return {(s["metric"]["org"], s["metric"]["window"]): float(s["value"][1]) for s in result}


# The per-window families of the other collectors, each checked like the usage ones.
WINDOWED: Final = {"devin_consumption_acus": "consumption", "devin_usage_active_users": "active_users"}


def _wait_for_series(stack: Stack, timeout: float) -> None:
    """Until Prometheus has every (org set, window) usage, consumption and active-users series, devin_up
    and devin_collector_up are 1 for every org set and collector, (with the organizations collector)
    every organization is listed, and (with the queue collector) the queue is there."""
    profile = stack.profile

    def probe() -> bool:
        for metric in USAGE_METRICS.values():
            keys = set(_by_org_window(stack.prom.query(metric)))
            assert keys == profile.usage_keys(metric), (metric, sorted(keys))
        for metric, collector in WINDOWED.items():
            keys = set(_by_org_window(stack.prom.query(metric)))
            assert keys == profile.keys_of(collector), (metric, sorted(keys))
        up = {s["metric"]["org"]: float(s["value"][1]) for s in stack.prom.query("devin_up")}
        assert up == dict.fromkeys(profile.org_sets, 1.0), up
        collectors = {(s["metric"]["collector"], s["metric"].get("org")): float(s["value"][1])
                      for s in stack.prom.query("devin_collector_up")}
        assert collectors == dict.fromkeys(profile.collector_keys(), 1.0), collectors
        if "organizations" in profile.collectors:
            listed = stack.prom.query("devin_organization_info")
            assert len(listed) == len(DEFAULT_ORGANIZATIONS), listed
        if "queue" in profile.collectors:
            assert len(stack.prom.query("devin_queue_size")) == 1
        return True

    wait_until("every usage series in Prometheus and every org set and collector up", probe,
               timeout=timeout, processes=stack.processes)


def _labels(stack: Stack, labels: Mapping[str, str]) -> frozenset[tuple[str, str]]:
    """A Prometheus sample's labels less __name__ and the scrape target's job and instance (checked)."""
    assert (labels.get("job"), labels.get("instance")) == (JOB, stack.instance), labels
    return frozenset((k, v) for k, v in labels.items() if k not in ("__name__", "job", "instance"))


def _in_prometheus(stack: Stack, name: str, at: float | None = None) -> dict[frozenset[tuple[str, str]], float]:
    """Every series of `name` in Prometheus at `at`: its labels (less the target's) -> value."""
    return {_labels(stack, s["metric"]): float(s["value"][1]) for s in stack.prom.query(name, at=at)}


def _served(samples: list[tuple[dict[str, str], float]]) -> dict[frozenset[tuple[str, str]], float]:
    return {frozenset(labels.items()): value for labels, value in samples}


# ---------------------------------------------------------------------------------- scraping


def test_prometheus_scrapes_the_exporter(stack: Stack) -> None:
    def target_up() -> dict[str, Any] | None:
        active = stack.prom.get("/api/v1/targets", {"state": "active"})["activeTargets"]
        assert len(active) == 1, active
        return active[0] if active[0]["health"] == "up" else None

    target = wait_until("the exporter target to be up", target_up, timeout=20, processes=stack.processes)
    assert target["labels"]["job"] == JOB
    assert target["scrapeUrl"] == stack.exporter_url + "/metrics"
    assert target["lastError"] == ""
    # The targets API can report the scrape before its samples are committed: wait for them too.
    up = wait_until("the scrape's up sample", lambda: stack.prom.query(f'up{{job="{JOB}"}}'),
                    timeout=10, processes=stack.processes)
    assert [float(s["value"][1]) for s in up] == [1.0]


# Families whose values stay put while every poll succeeds: Prometheus must hold exactly the
# exporter's values. The others move with every poll (counts, timestamps, counters); their
# values are checked against the API's answers below, their series here.
STEADY: Final = frozenset({
    "devin_up", "devin_collector_up", "devin_exporter_poll_interval_seconds", "devin_exporter_api_info",
    "devin_exporter_build_info", "devin_exporter_config_last_reload_successful",
    "devin_exporter_config_last_reload_success_timestamp_seconds", "devin_organization_info",
    "devin_organization_acu_cycle_limit", "devin_organization_session_acu_limit", "devin_acu_cycle_limit",
    "devin_billing_cycle_start_timestamp_seconds", "devin_billing_cycle_end_timestamp_seconds",
})


def test_prometheus_holds_every_series_the_exporter_serves(stack: Stack) -> None:
    _wait_for_series(stack, timeout=30)
    served = {name: samples for name, samples in stack.exporter_metrics().items() if name.startswith("devin_")}
    at = time.time()

    # Every family of every collector the stack enables is served (none left out by a version or
    # a filter: some set can always be answered), and nothing else of the catalogue.
    declared = {f.name for f in all_families()}
    assert {name for name in served if name in declared} == declared - stack.profile.unpublished()
    assert "devin_exporter_api_info" in served
    assert _served(served["devin_exporter_api_info"]) == {frozenset({("version", stack.profile.version)}): 1.0}

    for name, samples in sorted(served.items()):
        in_prometheus = _in_prometheus(stack, name, at)
        assert set(in_prometheus) == set(_served(samples)), name
        if name in STEADY:
            assert in_prometheus == _served(samples), name


def _api_polls(stack: Stack) -> dict[tuple[str, str], list[tuple[datetime, tuple[int, ...]]]]:
    """Every successful API call the simulator answered, as (time, counts) per (org set, window).

    Each recorded request carries the query the exporter sent and the simulator's clock when it
    arrived; `expected_usage` recomputes, exactly, the body the simulator returned for it.
    """
    by_filter = {(tuple(sorted(spec.org_ids)), tuple(sorted(spec.user_ids))): name
                 for name, spec in ORG_SETS.items()}
    by_seconds = {seconds: window for window, seconds in WINDOW_SECONDS.items()}
    polls: dict[tuple[str, str], list[tuple[datetime, tuple[int, ...]]]] = {}
    for record in http_json("GET", stack.simulator_url + "/-/requests"):
        if record["path"] != USAGE_PATH or record["status"] != 200:
            continue
        query = record["query"]
        org_ids, user_ids = query.get("org_ids", []), query.get("user_ids", [])
        org = by_filter[(tuple(sorted(org_ids)), tuple(sorted(user_ids)))]
        start, end = parse_datetime(query["start_date"][0]), parse_datetime(query["end_date"][0])
        window = by_seconds[int((end - start).total_seconds())]
        at = datetime.fromisoformat(record["time"])
        counts = expected_usage(org_ids, user_ids, start, end, now=at)
        polls.setdefault((org, window), []).append((at, tuple(counts[f] for f in USAGE_METRICS)))
    return polls


@V2_ONLY
def test_usage_series_equal_what_the_api_returned(stack: Stack) -> None:
    # The counts move as the simulator's clock moves, so "Prometheus equals the exporter" cannot
    # be compared value by value at one instant without a race. Instead, both are compared with
    # the API's answers: the simulator logs every request (query and arrival time), from which
    # `expected_usage` recomputes each body exactly. For every (org set, window), the five usage
    # values Prometheus holds at one instant (one scrape, one poll's result) must equal, together,
    # the counts of one of those polls, a recent one; so must the five the exporter serves.
    _wait_for_series(stack, timeout=30)
    at = time.time()
    in_prometheus: dict[tuple[str, str], dict[str, float]] = {}
    for metric in USAGE_METRICS.values():
        for sample in stack.prom.query(metric, at=at):
            labels = sample["metric"]
            key = (labels["org"], labels["window"])
            in_prometheus.setdefault(key, {})[metric] = float(sample["value"][1])
            spec = ORG_SETS[key[0]]
            assert labels == {"__name__": metric, "org": key[0], "window": key[1], **spec.labels,
                              "job": JOB, "instance": stack.exporter_url.removeprefix("http://")}
    exporter = stack.exporter_metrics()
    polls = _api_polls(stack)  # fetched last: it holds every poll either value can come from

    assert set(in_prometheus) == SERIES_KEYS
    for key in sorted(SERIES_KEYS):
        candidates = polls.get(key)
        assert candidates, f"the simulator saw no successful poll of {key}"
        seen = tuple(int(in_prometheus[key][m]) for m in USAGE_METRICS.values())
        matching = [t for t, counts in candidates if counts == seen]
        assert matching, (f"Prometheus has {seen} for {key}, which no poll returned; "
                          f"the last polls returned {[c for _, c in candidates[-5:]]}")
        assert max(matching).timestamp() >= at - 30, f"{key}: Prometheus' values are from an old poll"

        served = tuple(
            int(value) for metric in USAGE_METRICS.values() for labels, value in exporter[metric]
            if (labels["org"], labels["window"]) == key)
        assert served in {counts for _, counts in candidates}, (key, served)
        assert all(v >= 0 for v in seen) and seen[2] >= seen[3] >= seen[4], (key, seen)


# The v3 usage calls' reply fields and the families they become (SPEC §10).
V3_USAGE_FIELDS: Final = {
    SESSIONS_PATH: {
        "sessions_created_count": "devin_usage_sessions",
        "sessions_created_with_playbook_count": "devin_usage_sessions_with_playbook",
        "sessions_created_with_search_count": "devin_usage_sessions_with_search",
        "sessions_with_merged_prs_count": "devin_usage_sessions_with_merged_prs",
        "avg_acus_per_session": "devin_usage_acus_per_session",
    },
    PRS_PATH: {
        "prs_opened_count": "devin_usage_prs_opened",
        "prs_closed_count": "devin_usage_prs_closed",
        "prs_merged_count": "devin_usage_prs_merged",
        "prs_created_count": "devin_usage_prs_created",
    },
    SEARCHES_PATH: {"searches_created_count": "devin_usage_searches"},
}
# Fields of the sessions reply that map a key to a count: one series per key, the key a label.
V3_BY_KEY: Final = {
    "sessions_created_by_origin": ("devin_usage_sessions_by_origin", "origin"),
    "sessions_created_by_size": ("devin_usage_sessions_by_size", "size"),
}
V3_FAMILIES: Final = {
    SESSIONS_PATH: (*V3_USAGE_FIELDS[SESSIONS_PATH].values(), *(family for family, _ in V3_BY_KEY.values())),
    PRS_PATH: tuple(V3_USAGE_FIELDS[PRS_PATH].values()),
    SEARCHES_PATH: tuple(V3_USAGE_FIELDS[SEARCHES_PATH].values()),
}

# (family, its own labels such as origin) -> value: one call's worth of one (org set, window)'s series.
Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass(frozen=True)
class V3Poll:
    """One successful v3 usage call the simulator answered, and the series its reply becomes."""

    path: str
    org_ids: tuple[str, ...]  # sorted: the reply does not depend on the order
    user_ids: tuple[str, ...]
    after: int
    before: int
    at: datetime  # the simulator's clock when it arrived
    series: Series

    def asks(self, spec: OrgSetSpec, window: str) -> bool:
        """The call is one of this org set's polls of this window."""
        if (self.org_ids, self.user_ids) != (tuple(sorted(spec.org_ids)), tuple(sorted(spec.user_ids))):
            return False
        if window == "billing_cycle":
            return self.after == billing_cycle(self.at)[0].timestamp()
        return self.before - self.after == WINDOW_SECONDS[window]


def _v3_series(path: str, body: Mapping[str, Any]) -> Series:
    series: Series = {(family, frozenset()): float(body[field_name])
                      for field_name, family in V3_USAGE_FIELDS[path].items()}
    if path == SESSIONS_PATH:
        for field_name, (family, label) in V3_BY_KEY.items():
            series |= {(family, frozenset({(label, key)})): float(count) for key, count in body[field_name].items()}
    return series


def _v3_polls(stack: Stack) -> list[V3Poll]:
    """Every successful v3 usage call, each reply recomputed exactly, as in `_api_polls`."""
    polls = []
    for record in http_json("GET", stack.simulator_url + "/-/requests"):
        path = record["path"]
        if path not in V3_USAGE_FIELDS or record["status"] != 200:
            continue
        query = record["query"]
        org_ids, user_ids = query.get("org_ids", []), query.get("user_ids", [])
        after, before = int(query["time_after"][0]), int(query["time_before"][0])
        at = datetime.fromisoformat(record["time"])
        if path == SESSIONS_PATH:
            body = expected_sessions(org_ids, user_ids, after, before, now=at)
        elif path == PRS_PATH:
            body = expected_prs(org_ids, user_ids, after, before, now=at)
        else:
            assert not user_ids, "searches take no user_ids: a set with user_ids must not ask for them"
            body = expected_searches(org_ids, after, before, now=at)
        polls.append(V3Poll(path, tuple(sorted(org_ids)), tuple(sorted(user_ids)), after, before, at,
                            _v3_series(path, body)))
    return polls


def _v3_usage(stack: Stack, samples: Mapping[str, list[tuple[dict[str, str], float]]]
              ) -> dict[tuple[str, str], Series]:
    """(org set, window) -> its usage series, from samples by family (the exporter's or Prometheus'),
    checking each series' labels: org, window, the set's static labels, and the family's own."""
    usage: dict[tuple[str, str], Series] = {}
    own_label = {family: label for family, label in V3_BY_KEY.values()}
    for families in V3_FAMILIES.values():
        for family in families:
            for labels, value in samples.get(family, []):
                key = (labels["org"], labels["window"])
                spec = stack.profile.org_sets[key[0]]
                base = {"org": key[0], "window": key[1], **spec.labels}
                own = {k: v for k, v in labels.items() if k not in base}
                assert {k: labels.get(k) for k in base} == base, (family, labels)
                assert set(own) == ({own_label[family]} if family in own_label else set()), (family, labels)
                usage.setdefault(key, {})[(family, frozenset(own.items()))] = value
    return usage


@V3_ONLY
def test_v3_usage_series_equal_what_the_api_returned(stack: Stack) -> None:
    # As the v2 test: each v3 call (sessions, PRs, searches) answers several families at once; for
    # every (org set, window) and call, the values Prometheus holds at one instant must equal, together,
    # one recent poll's reply, recomputed from the simulator's request log; so must the exporter's.
    _wait_for_series(stack, timeout=30)
    at = time.time()
    in_prometheus = _v3_usage(stack, {
        family: [(dict(_labels(stack, s["metric"])), float(s["value"][1])) for s in stack.prom.query(family, at=at)]
        for families in V3_FAMILIES.values() for family in families})
    exporter = _v3_usage(stack, stack.exporter_metrics())
    polls = _v3_polls(stack)  # fetched last: it holds every poll either value can come from

    assert set(in_prometheus) == set(exporter) == stack.profile.series_keys
    for (org, window), series in sorted(in_prometheus.items()):
        spec = stack.profile.org_sets[org]
        for path, families in V3_FAMILIES.items():
            seen = {k: v for k, v in series.items() if k[0] in families}
            served = {k: v for k, v in exporter[(org, window)].items() if k[0] in families}
            if path == SEARCHES_PATH and spec.user_ids:
                assert not seen and not served, f"{org}: searches published for a set with user_ids"
                continue
            candidates = [p for p in polls if p.path == path and p.asks(spec, window)]
            assert candidates, f"the simulator saw no successful {path} poll of {(org, window)}"
            matching = [p.at for p in candidates if p.series == seen]
            assert matching, (f"Prometheus has {seen} for {(org, window)}, which no {path} poll returned; "
                              f"the last polls returned {[p.series for p in candidates[-3:]]}")
            assert max(matching).timestamp() >= at - 30, f"{(org, window)}: Prometheus' {path} values are old"
            assert served in [p.series for p in candidates], ((org, window), path, served)
        counts = {family: value for (family, _), value in series.items()}
        assert (counts["devin_usage_prs_merged"] <= counts["devin_usage_prs_closed"]
                <= counts["devin_usage_prs_opened"] <= counts["devin_usage_prs_created"]), (org, window, counts)

    # billing_cycle windows send the current cycle's start, from the cycles endpoint, as time_after.
    spec = stack.profile.org_sets["mobile-oncall"]
    cycle_polls = [p for p in polls if (p.org_ids, p.user_ids) == (spec.org_ids, spec.user_ids)
                   and p.before - p.after != WINDOW_SECONDS["24h"]]
    assert cycle_polls
    for poll in cycle_polls:
        assert poll.after == billing_cycle(poll.at)[0].timestamp(), (poll.path, poll.after, poll.before)


@V3_ONLY
def test_v3_organization_series_equal_what_the_api_lists(stack: Stack) -> None:
    _wait_for_series(stack, timeout=30)
    served = stack.exporter_metrics()
    organizations = DEFAULT_ORGANIZATIONS  # what the simulator lists (paged: two per page)
    limits = {o.org_id: o.max_cycle_acu_limit for o in organizations}
    expected: dict[str, dict[frozenset[tuple[str, str]], float]] = {
        "devin_organization_info": {frozenset({("org_id", o.org_id), ("org_name", o.name)}): 1.0
                                    for o in organizations},
        "devin_organization_acu_cycle_limit": {frozenset({("org_id", o.org_id)}): float(o.max_cycle_acu_limit)
                                               for o in organizations if o.max_cycle_acu_limit is not None},
        "devin_organization_session_acu_limit": {frozenset({("org_id", o.org_id)}): float(o.max_session_acu_limit)
                                                 for o in organizations if o.max_session_acu_limit is not None},
        # An org set's limit is its organizations' sum when each has one; the enterprise has none.
        "devin_acu_cycle_limit": {
            frozenset({("org", name), *spec.labels.items()}): float(sum(limits[i] or 0 for i in spec.org_ids))
            for name, spec in stack.profile.org_sets.items()
            if spec.org_ids and all(limits[i] is not None for i in spec.org_ids)},
    }
    start, end = billing_cycle(datetime.now(UTC))
    expected["devin_billing_cycle_start_timestamp_seconds"] = {frozenset(): start.timestamp()}
    expected["devin_billing_cycle_end_timestamp_seconds"] = {frozenset(): end.timestamp()}
    # Both sides of the limit's rule are exercised: sets with and sets without one.
    with_limit = {dict(labels)["org"] for labels in expected["devin_acu_cycle_limit"]}
    assert {"mobile-oncall", "Mobile", "Growth"} <= with_limit and not {"enterprise", "platform"} & with_limit

    for name, series in expected.items():
        assert _in_prometheus(stack, name) == series, name
        assert _served(served.get(name, [])) == series, name


def _consumption_window(after: int, before: int, at: datetime) -> str:
    """The consumption window a request's bounds mean (V3_CONSUMPTION_WINDOWS; poll.timezone UTC)."""
    if before - after == WINDOW_SECONDS["7d"]:
        return "7d"
    if after == billing_cycle(at)[0].timestamp():
        return "billing_cycle"
    midnight = datetime.fromtimestamp(before, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    assert after == midnight.timestamp(), (after, before, at)
    return "today"


def _by_org_window_of(samples: list[tuple[Mapping[str, str], float]]) -> dict[tuple[str, str], float]:
    return {(labels["org"], labels["window"]): value for labels, value in samples}


@V3_ONLY
def test_v3_cost_adoption_and_queue_series_equal_what_the_api_returned(stack: Stack) -> None:
    # As the usage tests: the values Prometheus holds at one instant, and those the exporter serves,
    # must each be what recent calls returned, recomputed exactly from the simulator's request log.
    # A set's ACUs are the sum of its organizations' replies (one call each), so they must equal the
    # sum of one recent reply per organization; active users and the queue are one call each.
    _wait_for_series(stack, timeout=30)
    at = time.time()
    acus = {(s["metric"]["org"], s["metric"]["window"]): float(s["value"][1])
            for s in stack.prom.query("devin_consumption_acus", at=at)}
    users = {(s["metric"]["org"], s["metric"]["window"]): float(s["value"][1])
             for s in stack.prom.query("devin_usage_active_users", at=at)}
    queue_size = [float(s["value"][1]) for s in stack.prom.query("devin_queue_size", at=at)]
    queue_status = {s["metric"]["status"]: float(s["value"][1]) for s in stack.prom.query("devin_queue_status", at=at)}
    # The products of one reply add up to its total, so they must in Prometheus at one instant too.
    by_product: dict[tuple[str, str], float] = {}
    for sample in stack.prom.query("devin_consumption_acus_by_product", at=at):
        key = (sample["metric"]["org"], sample["metric"]["window"])
        by_product[key] = by_product.get(key, 0.0) + float(sample["value"][1])
    served = stack.exporter_metrics()
    requests = [r for r in http_json("GET", stack.simulator_url + "/-/requests")  # fetched last
                if r["status"] == 200 and datetime.fromisoformat(r["time"]).timestamp() >= at - 30]

    assert set(acus) == set(by_product) == stack.profile.keys_of("consumption")
    assert set(users) == stack.profile.keys_of("active_users")
    for key, total in acus.items():
        assert math.isclose(by_product[key], total, abs_tol=0.005 * 4), (key, by_product[key], total)

    # Consumption: (owner, window) -> totals recent calls returned; owner is an org id, or None for
    # the enterprise endpoint (a set without filters).
    replies: dict[tuple[str | None, str], set[float]] = {}
    for record in requests:
        path = record["path"]
        if path != CONSUMPTION_PATH and not path.startswith(ORG_CONSUMPTION_PATH):
            continue
        org_id = path.removeprefix(ORG_CONSUMPTION_PATH) if path != CONSUMPTION_PATH else None
        after, before = int(record["query"]["time_after"][0]), int(record["query"]["time_before"][0])
        when = datetime.fromisoformat(record["time"])
        body = expected_consumption_v3(after, before, now=when, org_id=org_id)
        replies.setdefault((org_id, _consumption_window(after, before, when)), set()).add(float(body["total_acus"]))
    served_acus = _by_org_window_of(served["devin_consumption_acus"])
    for (org, window), value in sorted(acus.items()):
        owners: list[str | None] = list(stack.profile.org_sets[org].org_ids) or [None]
        candidates = [replies.get((owner, window), set()) for owner in owners]
        assert all(candidates), f"no recent consumption call of {owners} for {(org, window)}"
        sums = {round(math.fsum(parts), 2) for parts in itertools.product(*candidates)}
        assert round(value, 2) in sums, (f"Prometheus has {value} ACUs for {(org, window)}, no sum of recent "
                                         f"replies: {sorted(sums)[-5:]}")
        assert round(served_acus[(org, window)], 2) in sums, (org, window, served_acus[(org, window)])

    # Active users: one call per set and window, named by its org_ids.
    by_filter = {tuple(sorted(spec.org_ids)): name for name, spec in stack.profile.org_sets.items()
                 if stack.profile.polls("active_users", name)}
    counted: dict[tuple[str, str], set[float]] = {}
    for record in requests:
        if record["path"] != ACTIVE_USERS_PATH:
            continue
        query = record["query"]
        org = by_filter[tuple(sorted(query.get("org_ids", [])))]
        after, before = int(query["time_after"][0]), int(query["time_before"][0])
        window = next(w for w, seconds in WINDOW_SECONDS.items() if seconds == before - after)
        body = expected_active_users(query.get("org_ids", []), after, before,
                                     now=datetime.fromisoformat(record["time"]),
                                     min_sessions=int(query["min_sessions"][0]),
                                     min_searches=int(query["min_searches"][0]))
        counted.setdefault((org, window), set()).add(float(body["active_users"]))
    served_users = _by_org_window_of(served["devin_usage_active_users"])
    for key, value in sorted(users.items()):
        assert value in counted.get(key, set()), (key, value, counted.get(key))
        assert served_users[key] in counted[key], (key, served_users[key], counted[key])

    # The queue: its size and, as a state set, the status of one recent reply.
    queues = [expected_queue(datetime.fromisoformat(r["time"])) for r in requests if r["path"] == QUEUE_PATH]
    assert queues, "no recent queue call"
    assert len(queue_size) == 1
    shown = {(queue_size[0], status) for status, value in queue_status.items() if value == 1}
    assert len(shown) == 1 and set(queue_status) >= {"normal", "elevated", "high"}, queue_status
    assert shown <= {(float(q["queue_size"]), q["status"]) for q in queues}, (shown, queues[-3:])


@V3_ONLY
def test_v3_discovery_polls_every_organization_beside_the_configured_sets(stack: Stack) -> None:
    assert sorted(DISCOVERED.values()) == sorted(o.org_id for o in DEFAULT_ORGANIZATIONS)
    _wait_for_series(stack, timeout=30)  # devin_up is 1 for every configured and discovered set
    # A discovered set carries its organization's id, which joins it to the organization's name.
    joined = stack.prom.query(
        'max by (org, org_id, window) (devin_usage_sessions{source="discovery"})'
        " * on (org_id) group_left (org_name) max by (org_id, org_name) (devin_organization_info)")
    names = {o.org_id: o.name for o in DEFAULT_ORGANIZATIONS}
    assert {(s["metric"]["org"], s["metric"]["org_id"], s["metric"]["window"], s["metric"]["org_name"])
            for s in joined} == {(name, org_id, "24h", names[org_id]) for name, org_id in DISCOVERED.items()}
    # Configured sets are not discovered ones, though they filter by the same organizations.
    assert not stack.prom.query('devin_usage_sessions{source!="discovery", org_id!=""}')


# ---------------------------------------------------------------------------------- rules


def _rules_in_file() -> dict[str, dict[str, str]]:
    """Group name -> {rule name -> "recording"/"alerting"} as the shipped file declares them."""
    document = yaml.safe_load(RULES_FILE.read_text())
    return {
        group["name"]: {
            rule.get("record") or rule["alert"]: "recording" if "record" in rule else "alerting"
            for rule in group["rules"]
        }
        for group in document["groups"]
    }


def _recorded() -> dict[str, str]:
    """Recording rule name -> its expression, as the shipped file declares them."""
    document = yaml.safe_load(RULES_FILE.read_text())
    return {rule["record"]: rule["expr"] for group in document["groups"] for rule in group["rules"]
            if "record" in rule}


def _rule_names(text: str) -> set[str]:
    """Recording rule names in an expression (level:metric:operations, with colons)."""
    return set(re.findall(r"(?<![\w:])[a-z_][a-z0-9_]*:[a-z0-9_:]+(?![\w:])", text))


def _reads(expr: str) -> set[str]:
    """The exporter's metrics an expression reads, directly or through the recording rules it uses."""
    rules = _recorded()
    names: set[str] = set()
    seen: set[str] = set()
    todo = [expr]
    while todo:  # bounded: each rule is expanded once
        text = todo.pop()
        names |= _metric_names(text)
        for rule in (_rule_names(text) & set(rules)) - seen:
            seen.add(rule)
            todo.append(rules[rule])
    return names


# The shipped default of devin:threshold:acu_budget_used_ratio (DevinACUBudgetNearlyUsed).
ACU_BUDGET_USED_RATIO: Final = 0.9


def _alerts_the_data_calls_for(stack: Stack) -> set[tuple[str, str | None]]:
    """(alert, org set) of the alerts about the simulated data itself, which a healthy exporter
    rightly raises: the simulator's queue goes high every afternoon (UTC), and an org set can pass
    90 % of its cycle limit near the end of a long cycle. Read from the raw series, not the rules."""
    expected: set[tuple[str, str | None]] = set()
    if any(float(s["value"][1]) == 1 for s in stack.prom.query('devin_queue_status{status="high"}')):
        expected.add(("DevinQueueHigh", None))
    used = {s["metric"]["org"]: float(s["value"][1]) for s in stack.prom.query(
        'max by (org) (devin_consumption_acus{window="billing_cycle"})')}
    limits = {s["metric"]["org"]: float(s["value"][1]) for s in stack.prom.query(
        "max by (org) (devin_acu_cycle_limit)")}
    expected |= {("DevinACUBudgetNearlyUsed", org) for org, limit in limits.items()
                 if limit > 0 and used.get(org, 0.0) / limit >= ACU_BUDGET_USED_RATIO}
    return expected


def _loaded_rules(stack: Stack) -> dict[str, dict[str, dict[str, Any]]]:
    groups = stack.prom.get("/api/v1/rules")["groups"]
    return {group["name"]: {rule["name"]: rule for rule in group["rules"]} for group in groups}


def _evaluated_at(rule: dict[str, Any]) -> float:
    text = rule["lastEvaluation"]  # RFC 3339 with nanoseconds; Python takes microseconds
    text = re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()


def test_every_shipped_rule_evaluates_cleanly(stack: Stack) -> None:
    declared = _rules_in_file()
    _wait_for_series(stack, timeout=30)
    since = time.time()

    def evaluated_twice_since_data() -> dict[str, dict[str, dict[str, Any]]] | None:
        loaded = _loaded_rules(stack)
        rules = [rule for group in loaded.values() for rule in group.values()]
        # Evaluations run every second: two seconds after the data was there, every rule has had
        # at least a couple of evaluations over it.
        return loaded if rules and all(_evaluated_at(r) >= since + 2 for r in rules) else None

    loaded = wait_until("two rule evaluations over the scraped data", evaluated_twice_since_data,
                        timeout=20, processes=stack.processes)
    assert {g: {name: r["type"] for name, r in rules.items()} for g, rules in loaded.items()} == declared
    for group in loaded.values():
        for name, rule in group.items():
            assert rule["health"] == "ok", (name, rule)
            assert not rule.get("lastError"), (name, rule["lastError"])

    # Every recording rule returns data against a fresh Prometheus, except the week-over-week ones
    # (they need `offset 1w` data; their health is checked above) and those reading a collector the
    # stack does not enable, which must return nothing. The burn-rate rules need the cycle's ACUs to
    # have moved between two scrapes (increase() > 0 for days_left): a few seconds of polls.
    unpublished = stack.profile.unpublished()
    recording = {name: rule["query"] for group in loaded.values() for name, rule in group.items()
                 if rule["type"] == "recording" and "offset" not in rule["query"]}
    silent = {name for name, query in recording.items() if _reads(query) & unpublished}

    def all_recorded() -> bool:
        for name in sorted(recording):
            result = stack.prom.query(name)
            if name in silent:
                assert not result, f"recording rule {name} returns data without its collector: {result}"
                continue
            assert result, f"recording rule {name} ({recording[name]}) returned no data"
            assert all(math.isfinite(float(s["value"][1])) for s in result), (name, result)
        return True

    wait_until("every recording rule to return data", all_recorded, timeout=30, processes=stack.processes)
    if stack.profile.version == "v3":  # every collector runs: no rule is silent there
        assert not silent, silent
    ratio = _by_org_window(stack.prom.query("org_window:devin_usage_pr_merge_ratio:ratio"))
    assert ratio and set(ratio) <= stack.profile.series_keys and all(0 <= v <= 1 for v in ratio.values()), ratio

    if not stack.faulted:
        # A healthy exporter fires nothing but the alerts the simulated data itself calls for
        # (DevinExporterAbsent may be pending for an instant right after start-up, before the first
        # scrape, and the queue's status changes once in a while, hence the wait for one moment
        # at which the alerts and the data agree).
        def only_what_the_data_calls_for() -> bool:
            alerts = {(a["labels"]["alertname"], a["labels"].get("org"))
                      for a in stack.prom.get("/api/v1/alerts")["alerts"]}
            expected = _alerts_the_data_calls_for(stack)
            assert alerts == expected, (alerts, expected)
            return True

        wait_until("no Devin alert pending or firing while all is healthy, but those the data calls for",
                   only_what_the_data_calls_for, timeout=15, processes=stack.processes)


# ---------------------------------------------------------------------------------- dashboard


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
    return dashboard


def _dashboard_targets(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(panel["title"], target) for panel in iter_panels(dashboard["panels"])
            for target in panel.get("targets", [])]


def test_dashboard_is_importable_as_is() -> None:
    dashboard = _dashboard()
    assert dashboard["id"] is None
    assert dashboard["uid"] == "devin-usage"
    assert dashboard["title"] == "Devin usage"
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["tags"]
    assert "__inputs" not in dashboard and "${DS_" not in DASHBOARD_FILE.read_text()

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) >= {"datasource", "org", "window"}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name, metric in (("org", "devin_up"), ("window", "devin_usage_sessions")):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["multi"] is True and variable["includeAll"] is True
        assert variable["refresh"] == 2, "refresh on time range change"
        selector, label = parse_label_values(variable_query(variable))
        assert label == name and selector is not None and selector.startswith(metric)

    # Every datasource reference is the variable: no hard-coded uid anywhere.
    references = [node["datasource"] for node in iter_dicts(dashboard) if "datasource" in node]
    assert references
    for reference in references:
        assert reference == {"type": "prometheus", "uid": "${datasource}"}, reference

    panels = list(iter_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == ["Usage", "Pull requests", "Cost", "Adoption", "Queue", "Organizations", "Exporter health"]
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "table", "bargauge", "gauge"}, panel["type"]
        assert panel.get("description", "").strip(), f"panel {panel['title']!r} has no description"
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24

    exprs = [target["expr"] for _, target in _dashboard_targets(dashboard)]
    assert any("org_window:devin_usage_pr_merge_ratio:ratio" in e for e in exprs)
    # A recording rule renamed or dropped from the rules file would leave its panels empty.
    used = set().union(*(_rule_names(e) for e in exprs))
    assert used >= {"org:devin_acu_cycle_limit:used_ratio", "org:devin_acu_cycle_limit:days_left",
                    "org:devin_consumption_acus:projected_cycle_end",
                    "org_window:devin_consumption_acus_per_merged_pr:ratio",
                    "org_window:devin_usage_sessions_per_active_user:ratio"}, used
    assert used <= set(_recorded()), f"not in {RULES_FILE.name}: {sorted(used - set(_recorded()))}"
    for expr in exprs:
        # A fresh Prometheus has no week of history: such queries would show nothing.
        assert "offset" not in expr and ":wow_change" not in expr, expr
        if re.search(r"\b(rate|irate|increase)\(", expr):
            assert set(re.findall(r"\[([^\]]*)\]", expr)) == {"$__rate_interval"}, expr


def test_dashboard_variables_resolve(stack: Stack) -> None:
    _wait_for_series(stack, timeout=30)
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}

    def label_values(name: str, org: str = ".+") -> set[str]:
        selector, label = parse_label_values(variable_query(variables[name]))
        params = {} if selector is None else {"match[]": substitute(selector, {"org": org})}
        return set(stack.prom.get(f"/api/v1/label/{label}/values", params))

    org_sets = stack.profile.org_sets
    assert label_values("org") == set(org_sets)
    assert label_values("window") == stack.profile.windows
    if "$org" in variable_query(variables["window"]):  # chained: the windows of the chosen org sets
        assert label_values("window", org="mobile-oncall") == set(org_sets["mobile-oncall"].windows)


# ---------------------------------------------------------------------------------- failures


@dataclass
class FaultObservations:
    down_in_prometheus: set[str]
    collectors_down: set[tuple[str, str | None]]  # (collector, org set) with devin_collector_up 0
    pending: dict[str, dict[str, Any]]  # org set -> its DevinExporterDown alert
    collector_down: dict[str, dict[str, Any]]  # enterprise-level collector -> its DevinCollectorDown alert
    exporter_errors: dict[str, float]  # org set -> server_error count the exporter served


@pytest.fixture(scope="module")
def fault_cycle(stack: Stack) -> FaultObservations:
    """Make every API call fail (HTTP 500) until DevinExporterDown is pending, then heal the API.

    Runs once per module. Afterwards the error counters exist (so the dashboard's error panels
    have data) and everything is healthy again (so its usage panels have data too).
    """
    org_sets = set(stack.profile.org_sets)
    _wait_for_series(stack, timeout=30)
    http_json("POST", stack.simulator_url + "/-/faults", {"status": 500})
    stack.faulted = True
    deadline = time.monotonic() + 60

    def down() -> set[str] | None:
        orgs = {s["metric"]["org"] for s in stack.prom.query("devin_up == 0")}
        return orgs if orgs == org_sets else None

    down_orgs = wait_until("devin_up 0 in Prometheus for every org set", down,
                           timeout=deadline - time.monotonic(), processes=stack.processes)

    def collectors_down() -> set[tuple[str, str | None]] | None:
        keys = {(s["metric"]["collector"], s["metric"].get("org"))
                for s in stack.prom.query("devin_collector_up == 0")}
        return keys if keys == stack.profile.collector_keys() else None

    down_collectors = wait_until("devin_collector_up 0 in Prometheus for every collector and org set",
                                 collectors_down, timeout=deadline - time.monotonic(), processes=stack.processes)

    def pending() -> dict[str, dict[str, Any]] | None:
        alerts = {a["labels"]["org"]: a for a in stack.prom.get("/api/v1/alerts")["alerts"]
                  if a["labels"]["alertname"] == "DevinExporterDown" and a["state"] == "pending"}
        return alerts if set(alerts) == org_sets else None

    alerts = wait_until("DevinExporterDown pending for every org set", pending,
                        timeout=deadline - time.monotonic(), processes=stack.processes)

    def collector_down_pending() -> dict[str, dict[str, Any]] | None:
        # With every collector of a set failing, DevinExporterDown pages for the set, not one
        # DevinCollectorDown per collector (those pend only while the first polls fail and others
        # still work); the enterprise-level collectors have no set and page on their own.
        found = [a for a in stack.prom.get("/api/v1/alerts")["alerts"]
                 if a["labels"]["alertname"] == "DevinCollectorDown"]
        by_collector = {a["labels"]["collector"]: a for a in found if not a["labels"].get("org")}
        if len(by_collector) == len(found) and set(by_collector) == stack.profile.enterprise_collectors():
            return by_collector
        return None

    collector_down = wait_until("DevinCollectorDown pending for the enterprise-level collectors only",
                                collector_down_pending, timeout=deadline - time.monotonic(),
                                processes=stack.processes)

    def errors_rate() -> bool:
        # Two scrapes of the error counters, so rate() over them has data. Enterprise-level
        # collectors' counters have no org label: they are no org set's.
        result = stack.prom.query(
            'sum by (org) (rate(devin_exporter_api_errors_total{reason="server_error", org!=""}[30s])) > 0')
        return {s["metric"]["org"] for s in result} == org_sets

    wait_until("a server_error rate for every org set", errors_rate,
               timeout=deadline - time.monotonic(), processes=stack.processes)
    served = stack.exporter_metrics()
    exporter_errors: dict[str, float] = {}
    for labels, value in served["devin_exporter_api_errors_total"]:
        if labels["reason"] == "server_error" and "org" in labels:
            exporter_errors[labels["org"]] = exporter_errors.get(labels["org"], 0.0) + value

    http_json("DELETE", stack.simulator_url + "/-/faults")
    _wait_for_series(stack, timeout=30)
    wait_until("DevinExporterDown and DevinCollectorDown to leave pending once polls succeed again",
               lambda: not [a for a in stack.prom.get("/api/v1/alerts")["alerts"]
                            if a["labels"]["alertname"] in ("DevinExporterDown", "DevinCollectorDown")],
               timeout=20, processes=stack.processes)
    return FaultObservations(down_orgs, down_collectors, alerts, collector_down, exporter_errors)


def test_failing_api_makes_devin_exporter_down_pending(stack: Stack, fault_cycle: FaultObservations) -> None:
    org_sets = set(stack.profile.org_sets)
    assert fault_cycle.down_in_prometheus == org_sets
    assert fault_cycle.collectors_down == stack.profile.collector_keys()
    for org, alert in fault_cycle.pending.items():
        assert alert["state"] == "pending"  # `for: 15m` keeps it from firing within a test
        assert alert["labels"]["severity"] == "warning"
        assert alert["labels"]["job"] == JOB
        assert org in alert["annotations"]["summary"]
        assert float(alert["value"]) == 0.0
    assert set(fault_cycle.exporter_errors) == org_sets
    assert all(count >= 1 for count in fault_cycle.exporter_errors.values())
    assert set(fault_cycle.collector_down) == stack.profile.enterprise_collectors()
    for collector, alert in fault_cycle.collector_down.items():
        assert alert["state"] == "pending" and alert["labels"]["severity"] == "warning"
        assert collector in alert["annotations"]["summary"]
        assert float(alert["value"]) == 0.0


def _metric_names(text: str) -> set[str]:
    # Recording rules (`org_window:devin_usage_...:ratio`) have colons around the name; not metrics.
    return set(re.findall(r"(?<![\w:])devin_[a-z0-9_]+(?![\w:])", text))


def test_every_dashboard_query_returns_data(stack: Stack, fault_cycle: FaultObservations) -> None:
    targets = _dashboard_targets(_dashboard())
    assert targets
    # A panel of a collector the stack does not enable (the organizations panels on the v2 stack)
    # has nothing to show there, and must show nothing rather than something else.
    unpublished = stack.profile.unpublished()
    now = time.time()
    empty: list[str] = []
    for title, target in targets:
        assert "${datasource}" not in target["expr"]
        expr = substitute(target["expr"], DASHBOARD_VARIABLES)
        result = stack.prom.query(expr, at=now)  # asserts status success: the expression parses
        values = [float(s["value"][1]) for s in result]
        if _reads(target["expr"]) & unpublished:  # through the recording rules it uses, too
            assert not result, f"{title} [{target['refId']}] shows data without its collector: {result}"
            continue
        if "group_left (org_name)" in target["expr"]:  # an org id's panel: its name is joined in
            assert all(s["metric"].get("org_name") for s in result), (title, target["refId"], result)
        if not any(math.isfinite(v) for v in values):
            empty.append(f"{title} [{target['refId']}]: {expr} -> {result}")
            continue
        if target.get("range", not target.get("instant", False)):
            series = stack.prom.query_range(expr, now - 10, now, 5)
            if not series:
                empty.append(f"{title} [{target['refId']}] as a range query: {expr}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

    # The error panel's query shows the reason the fault caused.
    errors = next(t["expr"] for title, t in targets if title == "API errors by reason")
    reasons = {s["metric"].get("reason") for s in stack.prom.query(substitute(errors, DASHBOARD_VARIABLES))}
    assert "server_error" in reasons

    # The health panels show every collector, the enterprise-level ones (no org label) too.
    def shown(title: str, ref: str = "A") -> list[dict[str, str]]:
        expr = next(t["expr"] for panel, t in targets if panel == title and t["refId"] == ref)
        return [s["metric"] for s in stack.prom.query(substitute(expr, DASHBOARD_VARIABLES), at=now)]

    health = {(m["collector"], m.get("org")) for m in shown("Collector health")}
    assert health == stack.profile.collector_keys(), health
    for title in ("API errors by reason", "API requests by status code"):
        assert {m["collector"] for m in shown(title)} == set(stack.profile.collectors), title


def test_every_metric_the_rules_and_dashboard_use_is_exported(
    stack: Stack, fault_cycle: FaultObservations
) -> None:
    # A renamed metric would leave a rule healthy but silent and a panel empty; catch it here.
    # (Names of collectors the stack does not enable are exempt.)
    names = _metric_names(RULES_FILE.read_text() + DASHBOARD_FILE.read_text()) - stack.profile.unpublished()
    served = set(stack.exporter_metrics())
    missing = sorted(n for n in names if n not in served and f"{n}_bucket" not in served)
    assert not missing, f"referenced but not exported: {missing}"
