"""End to end with the real Prometheus server: simulator -> exporter -> Prometheus -> rules and dashboard.

Three real processes over loopback sockets: the API simulator (`python -m exporter simulate`), the
exporter (`python -m exporter --config ...`) polling it every 2 s, and `prometheus` scraping the
exporter every second and evaluating the shipped `prometheus-rules.yaml` every second. Through
Prometheus' HTTP API the tests check that the scraped usage series are the numbers the API
returned, that every shipped rule evaluates cleanly, that every query of the shipped Grafana
dashboard parses and returns data, and that a failing API puts `DevinExporterDown` in pending.

Everything waits by polling with a deadline; nothing sleeps a fixed time to let something happen.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
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

from exporter.simulator import DEFAULT_DEMO_KEY, USAGE_PATH, expected_usage, parse_datetime

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


@dataclass
class Stack:
    simulator_url: str
    exporter_url: str
    prom: PromAPI
    processes: Processes
    faulted: bool = False  # set once the fault cycle ran: error counters and alerts are then expected

    def exporter_metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        status, body = http_get(self.exporter_url + "/metrics")
        assert status == 200
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
        return samples


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    processes = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="devin-e2e-"))
    try:
        yield _start(processes, tmp)
    finally:
        processes.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def _start(processes: Processes, tmp: Path) -> Stack:
    env = python_env()

    # 1. The simulator, on a port it picks itself.
    simulator = processes.start(
        "simulator", python_argv("-m", "exporter", "simulate", "--listen", "127.0.0.1:0"), tmp,
        capture_stdout=True, env=env)
    line = read_line(simulator, time.monotonic() + 15)
    match = re.fullmatch(r"simulator listening on (http://127\.0\.0\.1:\d+)\n", line)
    assert match is not None, line
    simulator_url = match.group(1)

    # 2. The exporter, polling it every 2 s.
    config_file = tmp / "exporter.yaml"
    config_file.write_text(EXPORTER_CONFIG.format(base_url=simulator_url, key=DEFAULT_DEMO_KEY))
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
    return Stack(simulator_url, exporter_url, PromAPI(prometheus_url), processes)


def _by_org_window(result: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    return {(s["metric"]["org"], s["metric"]["window"]): float(s["value"][1]) for s in result}


def _wait_for_usage_series(stack: Stack, timeout: float) -> None:
    """Until Prometheus has every (org set, window) usage series and devin_up is 1 for every set."""

    def probe() -> bool:
        for metric in USAGE_METRICS.values():
            keys = set(_by_org_window(stack.prom.query(metric)))
            assert keys == SERIES_KEYS, (metric, sorted(keys))
        up = {s["metric"]["org"]: float(s["value"][1]) for s in stack.prom.query("devin_up")}
        assert up == dict.fromkeys(ORG_SETS, 1.0), up
        return True

    wait_until("every usage series in Prometheus and devin_up 1 for every org set", probe,
               timeout=timeout, processes=stack.processes)


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
    up = stack.prom.query(f'up{{job="{JOB}"}}')
    assert [float(s["value"][1]) for s in up] == [1.0]


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


def test_usage_series_equal_what_the_api_returned(stack: Stack) -> None:
    # The counts move as the simulator's clock moves, so "Prometheus equals the exporter" cannot
    # be compared value by value at one instant without a race. Instead, both are compared with
    # the API's answers: the simulator logs every request (query and arrival time), from which
    # `expected_usage` recomputes each body exactly. For every (org set, window), the five usage
    # values Prometheus holds at one instant (one scrape, one poll's result) must equal, together,
    # the counts of one of those polls, a recent one; so must the five the exporter serves.
    _wait_for_usage_series(stack, timeout=30)
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


def _loaded_rules(stack: Stack) -> dict[str, dict[str, dict[str, Any]]]:
    groups = stack.prom.get("/api/v1/rules")["groups"]
    return {group["name"]: {rule["name"]: rule for rule in group["rules"]} for group in groups}


def _evaluated_at(rule: dict[str, Any]) -> float:
    text = rule["lastEvaluation"]  # RFC 3339 with nanoseconds; Python takes microseconds
    text = re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()


def test_every_shipped_rule_evaluates_cleanly(stack: Stack) -> None:
    declared = _rules_in_file()
    _wait_for_usage_series(stack, timeout=30)
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

    # Recording rules that need no history return data against a fresh Prometheus; the
    # week-over-week ones need `offset 1w` data and stay empty here (their health is checked above).
    for group in loaded.values():
        for name, rule in group.items():
            if rule["type"] != "recording" or "offset" in rule["query"]:
                continue
            result = stack.prom.query(name)
            assert result, f"recording rule {name} ({rule['query']}) returned no data"
            assert all(math.isfinite(float(s["value"][1])) for s in result), (name, result)
    ratio = _by_org_window(stack.prom.query("org_window:devin_usage_pr_merge_ratio:ratio"))
    assert ratio and set(ratio) <= SERIES_KEYS and all(0 <= v <= 1 for v in ratio.values()), ratio

    if not stack.faulted:
        # A healthy exporter fires nothing (DevinExporterAbsent may be pending for an instant
        # right after start-up, before the first scrape, hence the wait).
        wait_until("no Devin alert pending or firing while all is healthy",
                   lambda: not stack.prom.get("/api/v1/alerts")["alerts"],
                   timeout=15, processes=stack.processes)


# ---------------------------------------------------------------------------------- dashboard


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
    return dashboard


def _dashboard_targets(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(panel["title"], target) for panel in iter_panels(dashboard["panels"])
            for target in panel.get("targets", [])]


def test_dashboard_is_importable_as_is(stack: Stack) -> None:
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
    assert rows == ["Usage", "Pull requests", "Exporter health"]
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "table", "bargauge"}, panel["type"]
        assert panel.get("description", "").strip(), f"panel {panel['title']!r} has no description"
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24

    exprs = [target["expr"] for _, target in _dashboard_targets(dashboard)]
    assert any("org_window:devin_usage_pr_merge_ratio:ratio" in e for e in exprs)
    for expr in exprs:
        # A fresh Prometheus has no week of history: such queries would show nothing.
        assert "offset" not in expr and ":wow_change" not in expr, expr
        if re.search(r"\b(rate|irate|increase)\(", expr):
            assert set(re.findall(r"\[([^\]]*)\]", expr)) == {"$__rate_interval"}, expr


def test_dashboard_variables_resolve(stack: Stack) -> None:
    _wait_for_usage_series(stack, timeout=30)
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}

    def label_values(name: str, org: str = ".+") -> set[str]:
        selector, label = parse_label_values(variable_query(variables[name]))
        params = {} if selector is None else {"match[]": substitute(selector, {"org": org})}
        return set(stack.prom.get(f"/api/v1/label/{label}/values", params))

    assert label_values("org") == set(ORG_SETS)
    assert label_values("window") == set(WINDOW_SECONDS)
    if "$org" in variable_query(variables["window"]):  # chained: the windows of the chosen org sets
        assert label_values("window", org="mobile-oncall") == set(ORG_SETS["mobile-oncall"].windows)


# ---------------------------------------------------------------------------------- failures


@dataclass
class FaultObservations:
    down_in_prometheus: set[str]
    pending: dict[str, dict[str, Any]]  # org set -> its DevinExporterDown alert
    exporter_errors: dict[str, float]  # org set -> server_error count the exporter served


@pytest.fixture(scope="module")
def fault_cycle(stack: Stack) -> FaultObservations:
    """Make every API call fail (HTTP 500) until DevinExporterDown is pending, then heal the API.

    Runs once per module. Afterwards the error counters exist (so the dashboard's error panels
    have data) and everything is healthy again (so its usage panels have data too).
    """
    _wait_for_usage_series(stack, timeout=30)
    http_json("POST", stack.simulator_url + "/-/faults", {"status": 500})
    stack.faulted = True
    deadline = time.monotonic() + 60

    def down() -> set[str] | None:
        orgs = {s["metric"]["org"] for s in stack.prom.query("devin_up == 0")}
        return orgs if orgs == set(ORG_SETS) else None

    down_orgs = wait_until("devin_up 0 in Prometheus for every org set", down,
                           timeout=deadline - time.monotonic(), processes=stack.processes)

    def pending() -> dict[str, dict[str, Any]] | None:
        alerts = {a["labels"]["org"]: a for a in stack.prom.get("/api/v1/alerts")["alerts"]
                  if a["labels"]["alertname"] == "DevinExporterDown" and a["state"] == "pending"}
        return alerts if set(alerts) == set(ORG_SETS) else None

    alerts = wait_until("DevinExporterDown pending for every org set", pending,
                        timeout=deadline - time.monotonic(), processes=stack.processes)

    def errors_rate() -> bool:
        # Two scrapes of the error counters, so rate() over them has data.
        result = stack.prom.query(
            'sum by (org) (rate(devin_exporter_api_errors_total{reason="server_error"}[30s])) > 0')
        return {s["metric"]["org"] for s in result} == set(ORG_SETS)

    wait_until("a server_error rate for every org set", errors_rate,
               timeout=deadline - time.monotonic(), processes=stack.processes)
    served = stack.exporter_metrics()
    exporter_errors = {labels["org"]: value for labels, value in served["devin_exporter_api_errors_total"]
                       if labels["reason"] == "server_error"}

    http_json("DELETE", stack.simulator_url + "/-/faults")
    _wait_for_usage_series(stack, timeout=30)
    wait_until("DevinExporterDown to leave pending once polls succeed again",
               lambda: not [a for a in stack.prom.get("/api/v1/alerts")["alerts"]
                            if a["labels"]["alertname"] == "DevinExporterDown"],
               timeout=20, processes=stack.processes)
    return FaultObservations(down_orgs, alerts, exporter_errors)


def test_failing_api_makes_devin_exporter_down_pending(stack: Stack, fault_cycle: FaultObservations) -> None:
    assert fault_cycle.down_in_prometheus == set(ORG_SETS)
    for org, alert in fault_cycle.pending.items():
        assert alert["state"] == "pending"  # `for: 15m` keeps it from firing within a test
        assert alert["labels"]["severity"] == "warning"
        assert alert["labels"]["job"] == JOB
        assert org in alert["annotations"]["summary"]
        assert float(alert["value"]) == 0.0
    assert set(fault_cycle.exporter_errors) == set(ORG_SETS)
    assert all(count >= 1 for count in fault_cycle.exporter_errors.values())


def test_every_dashboard_query_returns_data(stack: Stack, fault_cycle: FaultObservations) -> None:
    targets = _dashboard_targets(_dashboard())
    assert targets
    now = time.time()
    empty: list[str] = []
    for title, target in targets:
        assert "${datasource}" not in target["expr"]
        expr = substitute(target["expr"], DASHBOARD_VARIABLES)
        result = stack.prom.query(expr, at=now)  # asserts status success: the expression parses
        values = [float(s["value"][1]) for s in result]
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


def test_every_metric_the_rules_and_dashboard_use_is_exported(
    stack: Stack, fault_cycle: FaultObservations
) -> None:
    # A renamed metric would leave a rule healthy but silent and a panel empty; catch it here.
    text = RULES_FILE.read_text() + DASHBOARD_FILE.read_text()
    # Recording rules (`org_window:devin_usage_...:ratio`) have colons around the name; not metrics.
    names = set(re.findall(r"(?<![\w:])devin_[a-z0-9_]+(?![\w:])", text))
    served = set(stack.exporter_metrics())
    missing = sorted(n for n in names if n not in served and f"{n}_bucket" not in served)
    assert not missing, f"referenced but not exported: {missing}"
