"""End to end with the real binaries: backfill -> promtool blocks -> a real Prometheus beside the live exporter.

The simulator (`python -m exporter simulate`, on the real clock) answers two backfills, as an operator
would run them on the day of install: the last 8 days at `--step 1d` for the dashboards, and the hour
around a week ago at `--step 5m`, so that the week-over-week rules find last week's sample at every
moment. `promtool tsdb create-blocks-from openmetrics` turns both into blocks in one data directory;
`promtool tsdb dump` must show one sample per step end, org set and window with the simulator's
value. Then Prometheus starts on that directory with the shipped rules and scrapes the live
exporter: a week-over-week recording rule and a dashboard query answer for the backfilled days at
once, with the simulator's values at the step ends.

Everything waits by polling with a deadline; nothing sleeps a fixed time to let something happen.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
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
    iter_panels,
    python_argv,
    python_env,
    read_line,
    substitute,
    wait_until,
)

from exporter.simulator import expected_sessions

PROMETHEUS: Final = shutil.which("prometheus")
PROMTOOL: Final = shutil.which("promtool")

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="`prometheus` or `promtool` is not on PATH (Debian package `prometheus`; scripts/test installs it "
    "when run as root)",
)

TOKEN: Final = "cog_e2e_backfill_service_user"
WINDOWS: Final = ("24h", "7d")
WEEK: Final = 7 * 86400
# Two configured sets and one discovered (every other organization excluded), with its org_id label.
ORG_SETS: Final = {"enterprise": (), "platform": ("org-platform-1", "org-platform-2"), "Mobile": ("org-mobile",)}
CONFIG: Final = """\
api:
  base_url: {base_url}
  api_key: {key}
  timeout: 5s
  retries: 2
  max_concurrency: 8
  max_requests_per_second: 200
poll:
  interval: 2s
  jitter: 0
windows: [24h, 7d]
collectors:
  usage: {{enabled: true, interval: 2s}}
  organizations: {{enabled: true}}
  consumption: {{enabled: false}}
  active_users: {{enabled: false}}
  queue: {{enabled: false}}
discovery:
  organizations: true
  exclude: [org-platform-1, org-platform-2, org-123, org-456, org-789]
org_sets:
  - name: enterprise
  - name: platform
    org_ids: [org-platform-1, org-platform-2]
    labels: {{team: platform}}
server:
  listen: 127.0.0.1:9877
"""


@dataclass
class Stack:
    prom: PromAPI
    processes: Processes
    daily: list[int]  # the --step 1d step ends, Unix seconds
    recent: list[int]  # the --step 5m ones around a week ago
    dump: dict[tuple[str, str], dict[int, float]]  # promtool's sessions samples: (org, window) -> time -> value


def expected(org: str, window: str, at: int) -> int:
    """What the simulator serves for the set's window ending at `at`."""
    seconds = 86400 if window == "24h" else WEEK
    body = expected_sessions(ORG_SETS[org], [], at - seconds, at, now=datetime.now(UTC))
    return int(body["sessions_created_count"])  # type: ignore[call-overload]


def _floor(at: float, step: int) -> int:
    return int(at // step * step)


def _iso(at: int) -> str:
    return datetime.fromtimestamp(at, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _run(argv: list[str], tmp: Path, what: str) -> str:
    done = subprocess.run(argv, cwd=tmp, env=python_env(), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{what} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _dump(tsdb: Path) -> dict[tuple[str, str], dict[int, float]]:
    """`promtool tsdb dump` of the sessions series: (org, window) -> {unix seconds: value}."""
    (tsdb / "wal").mkdir(exist_ok=True)  # promtool's dump opens the WAL too, and blocks alone have none
    assert PROMTOOL is not None
    text = _run([PROMTOOL, "tsdb", "dump", '--match={__name__="devin_usage_sessions"}', str(tsdb)], tsdb, "dump")
    out: dict[tuple[str, str], dict[int, float]] = {}
    for line in text.splitlines():
        match = re.fullmatch(r"\{(.*)\} (\S+) (\d+)", line)
        assert match is not None, line
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        stamps = out.setdefault((labels["org"], labels["window"]), {})
        at = int(match.group(3)) // 1000
        assert at not in stamps, f"two samples at {at}: {line}"
        stamps[at] = float(match.group(2))
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("backfill-e2e")
    processes = Processes()
    try:
        yield _start(processes, tmp)
    finally:
        processes.stop_all()


def _start(processes: Processes, tmp: Path) -> Stack:
    env = python_env()
    simulator = processes.start("simulator", python_argv("-m", "exporter", "simulate", "--listen", "127.0.0.1:0",
                                                         "--v3-token", TOKEN), tmp, capture_stdout=True, env=env)
    match = re.fullmatch(r"simulator listening on (http://127\.0\.0\.1:\d+)\n",
                         read_line(simulator, time.monotonic() + 15))
    assert match is not None
    config = tmp / "exporter.yaml"
    config.write_text(CONFIG.format(base_url=match.group(1), key=TOKEN))

    # 1. The two backfills, through the real command line.
    now = time.time()
    end = _floor(now, 86400)
    daily = list(range(end - 7 * 86400, end + 1, 86400))
    week_ago = _floor(now - WEEK, 300)
    recent = list(range(week_ago - 1800 + 300, week_ago + 1800 + 1, 300))
    for name, first, last, step in (("daily", daily[0] - 86400, daily[-1], "1d"),
                                    ("recent", recent[0] - 300, recent[-1], "5m")):
        _run(python_argv("-m", "exporter", "backfill", "--config", str(config), "--start", _iso(first),
                         "--end", _iso(last), "--step", step, "--output", f"{name}.om"), tmp, f"backfill {name}")
        # 2. Blocks, all in the one data directory Prometheus will open.
        assert PROMTOOL is not None
        _run([PROMTOOL, "tsdb", "create-blocks-from", "openmetrics", f"{name}.om", "tsdb"], tmp, f"promtool {name}")
    dump = _dump(tmp / "tsdb")

    # 3. The live exporter and Prometheus on that directory, with the shipped rules.
    exporter_address = f"127.0.0.1:{free_port()}"
    processes.start("exporter", python_argv("-m", "exporter", "--config", str(config), "--listen", exporter_address),
                    tmp, env=env)
    prometheus_config = tmp / "prometheus.yml"
    prometheus_config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES_FILE.resolve())],
        "scrape_configs": [{"job_name": "devin-usage-exporter", "static_configs": [{"targets": [exporter_address]}]}],
    }))
    prometheus_address = f"127.0.0.1:{free_port()}"
    assert PROMETHEUS is not None
    processes.start("prometheus", [PROMETHEUS, f"--config.file={prometheus_config}",
                                   f"--storage.tsdb.path={tmp / 'tsdb'}", "--storage.tsdb.retention.time=30d",
                                   f"--web.listen-address={prometheus_address}", "--log.level=warn"], tmp)
    url = f"http://{prometheus_address}"
    wait_until("Prometheus' /-/ready to answer 200", lambda: http_get(url + "/-/ready", timeout=1)[0] == 200,
               timeout=30, processes=processes)
    return Stack(PromAPI(url), processes, daily, recent, dump)


def _by_set(result: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    return {(s["metric"]["org"], s["metric"]["window"]): float(s["value"][1]) for s in result}


def _rule(name: str) -> str:
    rules = yaml.safe_load(RULES_FILE.read_text())
    return next(str(r["expr"]) for group in rules["groups"] for r in group["rules"] if r.get("record") == name)


KEYS: Final = {(org, window) for org in ORG_SETS for window in WINDOWS}


def test_promtool_dump_has_one_sample_per_step_end_per_set_and_window_with_the_simulators_value(
        stack: Stack) -> None:
    assert set(stack.dump) == KEYS
    for (org, window), samples in stack.dump.items():
        steps = sorted({*stack.daily, *stack.recent})
        assert sorted(samples) == steps, (org, window)
        assert {at: int(v) for at, v in samples.items()} == {at: expected(org, window, at) for at in steps}


def test_the_week_over_week_rule_has_data_for_the_backfilled_days_at_once(stack: Stack) -> None:
    # Evaluated at the last daily step end: it and the one a week before are both backfilled.
    at = stack.daily[-1]
    got = _by_set(stack.prom.query(_rule("org_window:devin_usage_sessions:wow_change"), at=at))
    assert set(got) == KEYS
    for (org, window), value in got.items():
        assert value == pytest.approx(expected(org, window, at) / expected(org, window, at - WEEK) - 1)


def test_the_loaded_rule_records_week_over_week_from_live_data_and_last_weeks_backfill(stack: Stack) -> None:
    record = "org_window:devin_usage_sessions:wow_change"
    wait_until(f"{record} for every set and window", lambda: set(_by_set(stack.prom.query(record))) == KEYS,
               timeout=30, processes=stack.processes)
    # Its week-old half is the backfill: the 5m step end at or before a week ago, the simulator's value.
    at = time.time()
    last_week = _by_set(stack.prom.query("devin_usage_sessions offset 1w", at=at))
    step_end = _floor(at - WEEK, 300)
    assert last_week == {(org, window): expected(org, window, step_end) for org, window in KEYS}


def test_a_dashboard_query_graphs_the_backfilled_days(stack: Stack) -> None:
    dashboard = yaml.safe_load(DASHBOARD_FILE.read_text())  # JSON is YAML
    expr = next(t["expr"] for p in iter_panels(dashboard["panels"]) if p.get("title") == "Sessions over time"
                for t in p.get("targets", []))
    query = substitute(expr, {"org": ".+", "window": ".+"})
    result = stack.prom.query_range(query, stack.daily[0], stack.daily[-1], 86400)
    got = {(s["metric"]["org"], s["metric"]["window"]): {int(float(t)): float(v) for t, v in s["values"]}
           for s in result}
    assert got == {(org, window): {at: expected(org, window, at) for at in stack.daily} for org, window in KEYS}
