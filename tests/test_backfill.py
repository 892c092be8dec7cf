"""`devin-usage-exporter backfill` (SPEC §12): the live series at every step end, as OpenMetrics promtool can load.

The simulator and a live exporter run in-process on one fake wall clock (tests/v3_support.py), so
the backfill's samples at a step end are compared with what the live exporter publishes when its
clock says that step end, and its requests with the live poll's requests.
"""

from __future__ import annotations

import io
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import pytest
from aiohttp import web
from helpers import ROOT, WallClock, config_text, query_key, subprocess_env
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from v3_support import V3_TOKEN, Rig, Rigs

from exporter.backfill import backfill, build_parser, main, resolve
from exporter.clocks import Clocks
from exporter.progress import PLAIN_EVERY, Progress
from exporter.simulator import (
    INCEPTION,
    REQUESTS_KEY,
    Faults,
    RecordedRequest,
    expected_consumption_v3,
    expected_sessions,
    start_simulator,
)

DAY: Final = 86400
D: Final = datetime(2026, 11, 24, tzinfo=UTC)  # the last step end of most tests
NOW: Final = D + timedelta(hours=18)
SETS: Final = """\
- name: enterprise
- name: platform
  org_ids: [org-platform-1, org-platform-2]
  labels: {team: platform}
- name: oncall
  org_ids: [org-mobile]
  user_ids: [user-1, user-2]
  windows: [24h]
"""
# One discovered set (the other organizations excluded), with its org_id and a discovery label.
DISCOVERY: Final = ("discovery: {organizations: true, exclude: [org-platform-1, org-platform-2, org-123, org-456, "
                    "org-789], labels: {source: discovery}}")
EVERY_WINDOWED: Final = "{queue: {enabled: false}, consumption: {windows: [today, 7d]}}"
ONLY_USAGE: Final = ("{queue: {enabled: false}, organizations: {enabled: false}, consumption: {enabled: false}, "
                     "active_users: {enabled: false}}")
WINDOWED_PATHS: Final = ("/v3/enterprise/metrics/", "/v3/enterprise/consumption/daily")

Series = tuple[str, frozenset[tuple[str, str]]]


@dataclass
class Simulator:
    """The simulator alone, for the tests that need no live exporter beside the backfill."""

    url: str
    faults: Faults
    runner: web.AppRunner

    def requests(self, prefix: str = "/") -> list[RecordedRequest]:
        log: list[RecordedRequest] = self.runner.app[REQUESTS_KEY]  # type: ignore[index]
        return [r for r in log if r.path.startswith(prefix)]


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    faults = Faults()
    runner, url = await start_simulator(v3_token=V3_TOKEN, faults=faults, clock=lambda: NOW)
    try:
        yield Simulator(url, faults, runner)
    finally:
        await runner.cleanup()


@dataclass
class Run:
    code: int
    stderr: str
    output: str


async def no_sleep(seconds: float) -> None:
    """Retries and rate-limit spacing go by at once: these tests are about what is asked, not when."""


async def run(rig_or_url: Rig | Simulator, tmp_path: Path, *flags: str, org_sets: str = SETS, now: datetime = NOW,
              collectors: str = EVERY_WINDOWED, extra: str = "", retries: int = 0, windows: str = "[1h, 24h, 7d]",
              terminal: bool = False) -> Run:
    """The backfill of `flags` against the rig's simulator, in-process, its wall clock at `now`."""
    url = rig_or_url.sim_url if isinstance(rig_or_url, Rig) else rig_or_url.url
    config = tmp_path / "backfill.yaml"
    config.write_text(config_text(url, org_sets, key=V3_TOKEN, collectors=collectors, extra=extra,
                                  retries=retries, windows=windows))
    output = tmp_path / "history.om"
    output.unlink(missing_ok=True)
    args = build_parser().parse_args(["--config", str(config), "--output", str(output), *flags])
    request = resolve(args, now.timestamp())
    stderr = io.StringIO()
    code = await backfill(request, stderr, io.StringIO(), terminal=terminal,
                          clocks=Clocks(wall=lambda: now.timestamp(), sleep=no_sleep, random=lambda: 0.0))
    return Run(code, stderr.getvalue(), output.read_text() if output.exists() else "")


def samples_at(text: str) -> dict[float, dict[Series, float]]:
    """Step end -> (name, labels) -> value, from OpenMetrics text (parsing it checks its shape too)."""
    out: dict[float, dict[Series, float]] = {}
    for family in openmetrics_families(text):
        for sample in family.samples:
            assert sample.timestamp is not None, sample
            out.setdefault(float(sample.timestamp), {})[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def windowed(text: str) -> dict[Series, float]:
    """The live exposition's per-window series: those with an `org` and a `window` label, health series aside."""
    out: dict[Series, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if {"org", "window"} <= sample.labels.keys() and not sample.name.startswith(("devin_collector_",
                                                                                        "devin_exporter_",
                                                                                        "devin_usage_last_")):
                out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def helps(text: str, parse: object = text_string_to_metric_families) -> dict[str, str]:
    return {f.name: f.documentation for f in parse(text)}  # type: ignore[operator]


def windowed_requests(rig: Rig, since: int = 0) -> list[tuple[str, tuple[tuple[str, tuple[str, ...]], ...]]]:
    return sorted((r.path, query_key(r.query)) for r in rig.requests()[since:] if r.path.startswith(WINDOWED_PATHS))


# --- what is written -------------------------------------------------------------------------------


async def test_each_step_end_holds_what_a_live_poll_at_that_moment_publishes_and_asks(
        rigs: Rigs, tmp_path: Path) -> None:
    clock = WallClock(NOW)
    rig = await rigs.start(SETS, clock=clock, collectors=EVERY_WINDOWED, extra=DISCOVERY, windows="[1h, 24h, 7d]")
    logged = len(rig.requests())
    result = await run(rig, tmp_path, "--start", "2026-11-22", "--end", "2026-11-24", extra=DISCOVERY)
    assert result.code == 0, result.stderr
    backfilled = samples_at(result.output)
    asked = [r for r in rig.requests()[logged:] if r.path.startswith(WINDOWED_PATHS)]
    assert sorted(backfilled) == [(D - timedelta(days=1)).timestamp(), D.timestamp()]

    for step_end in (D - timedelta(days=1), D):
        clock.now = step_end
        logged = len(rig.requests())
        assert await rig.poller.poll_all_once()
        live = await rig.scrape()
        # The same series (families, org, window, static and discovery labels) with the same values.
        assert backfilled[step_end.timestamp()] == windowed(live)
        # The same requests: paths, filters, time bounds and options.
        at = str(int(step_end.timestamp()))
        assert sorted((r.path, query_key(r.query)) for r in asked if r.query["time_before"] == [at]) == \
            windowed_requests(rig, logged)
    sets = {dict(labels)["org"] for _, labels in backfilled[D.timestamp()]}
    assert sets == {"enterprise", "platform", "oncall", "Mobile"}  # "Mobile" is the discovered set
    live_help = helps(live)
    assert {name: text for name, text in helps(result.output, openmetrics_families).items()} == \
        {name: live_help[name] for name in helps(result.output, openmetrics_families)}


async def test_the_output_is_openmetrics_with_each_family_and_series_contiguous_in_time_order(
        simulator: Simulator, tmp_path: Path) -> None:
    result = await run(simulator, tmp_path, "--start", "2026-11-21T00:00:00Z", "--end", "2026-11-24T00:00:00Z",
                       "--step", "6h", collectors=ONLY_USAGE)
    assert result.code == 0, result.stderr
    lines = result.output.splitlines()
    assert lines[-1] == "# EOF" and lines.count("# EOF") == 1
    families: list[str] = []
    runs: list[str] = []  # each series where its run of lines starts
    stamps: dict[str, list[int]] = {}
    for line in lines[:-1]:
        if line.startswith("# TYPE "):
            families.append(line.split()[2])
            continue
        if line.startswith("#"):
            continue
        series, _value, stamp = line.rsplit(" ", 2)
        if not runs or runs[-1] != series:
            runs.append(series)
        stamps.setdefault(series, []).append(int(stamp))
        assert series.split("{")[0] == families[-1], line  # under its own family's TYPE
    assert len(families) == len(set(families))  # every family once
    assert len(runs) == len(set(runs))  # every series contiguous
    steps = [int((D - timedelta(hours=6 * i)).timestamp()) for i in range(11, -1, -1)]
    assert all(times == steps for times in stamps.values())  # every series at every step end, in time order
    # prometheus_client's strict OpenMetrics parser reads it whole.
    assert len(samples_at(result.output)) == 12
    assert ("devin_usage_sessions", frozenset({("org", "platform"), ("window", "24h"), ("team", "platform")})) in \
        samples_at(result.output)[D.timestamp()]


async def test_default_windows_are_the_configured_ones_of_at_most_seven_days(
        simulator: Simulator, tmp_path: Path) -> None:
    result = await run(simulator, tmp_path, "--start", "2026-11-23", "--end", "2026-11-24",
                       org_sets="- name: enterprise\n", collectors=ONLY_USAGE,
                       windows="[1h, today, 7d, 30d, month_to_date, billing_cycle]")
    assert result.code == 0, result.stderr
    windows = {dict(labels)["window"] for _, labels in samples_at(result.output)[D.timestamp()]}
    assert windows == {"1h", "today", "7d"}
    flagged = await run(simulator, tmp_path, "--start", "2026-11-23", "--end", "2026-11-24", "--windows", "30d",
                        org_sets="- name: enterprise\n", collectors=ONLY_USAGE)
    assert {dict(labels)["window"] for _, labels in samples_at(flagged.output)[D.timestamp()]} == {"30d"}


async def test_billing_cycle_sends_the_cycle_holding_each_step_end(simulator: Simulator, tmp_path: Path) -> None:
    collectors = ("{queue: {enabled: false}, usage: {enabled: false}, active_users: {enabled: false}, "
                  "organizations: {enabled: false}}")
    # Cycles start on the 5th at 08:00 UTC: the step ends of the 5th and the 6th are in different cycles.
    result = await run(simulator, tmp_path, "--start", "2026-11-04", "--end", "2026-11-06",
                       "--windows", "billing_cycle", org_sets="- name: enterprise\n", collectors=collectors)
    assert result.code == 0, result.stderr
    got = samples_at(result.output)
    for step_end, cycle_start in ((datetime(2026, 11, 5, tzinfo=UTC), datetime(2026, 10, 5, 8, tzinfo=UTC)),
                                  (datetime(2026, 11, 6, tzinfo=UTC), datetime(2026, 11, 5, 8, tzinfo=UTC))):
        expected = expected_consumption_v3(int(cycle_start.timestamp()), int(step_end.timestamp()), now=NOW)
        series = ("devin_consumption_acus", frozenset({("org", "enterprise"), ("window", "billing_cycle")}))
        assert got[step_end.timestamp()][series] == expected["total_acus"]


# --- flags ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "message"), [
    (["--start", "2026-11-10", "--end", "2026-11-01"], "--start 2026-11-10T00:00:00Z is not before --end"),
    (["--start", "2026-11-01T05:00:00Z", "--end", "2026-11-03"],
     "--start 2026-11-01T05:00:00Z is not a step end of --step 1d (step ends are multiples of the step from "
     "1970-01-01T00:00:00Z): use 2026-11-01T00:00:00Z or 2026-11-02T00:00:00Z"),
    (["--start", "2026-11-01", "--end", "2026-11-03", "--step", "30s"], "--step 30s is shorter than the minimum of 1m"),
    (["--start", "2026-11-01", "--end", "2026-11-03", "--step", "7m"], "--step 7m: a step must divide a day"),
    (["--start", "2026-11-01", "--end", "2099-11-03"], "--end 2099-11-03T00:00:00Z is in the future"),
    (["--start", "yesterday", "--end", "2026-11-03"], "--start 'yesterday' is not a date like 2026-11-01"),
    (["--start", "2026-11-01", "--end", "2026-11-03", "--windows", "24h,fortnight"],
     "--windows: 'fortnight' is not a window"),
])
def test_a_bad_range_or_step_is_one_line_naming_the_flag_and_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(config_text("http://127.0.0.1:9", "- name: enterprise\n"))
    stderr = io.StringIO()
    assert main(["--config", str(config), "--output", str(tmp_path / "out.om"), *flags], stderr=stderr) == 2
    text = stderr.getvalue()
    assert text.startswith("devin-usage-exporter backfill: error: ") and message in text, text
    assert text.count("\n") == 1 and "Traceback" not in text
    assert not (tmp_path / "out.om").exists()


def test_billing_cycle_of_v2_usage_has_no_history_and_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(config_text("http://127.0.0.1:9", "- name: enterprise\n"))  # a v2 key, usage only
    stderr = io.StringIO()
    code = main(["--config", str(config), "--start", "2026-11-01", "--end", "2026-11-03",
                 "--windows", "24h,billing_cycle", "--output", str(tmp_path / "o.om")], stderr=stderr)
    assert code == 2
    assert "collector usage on API v2 sends no dates for it" in stderr.getvalue()


def test_a_bad_config_is_a_config_error_naming_the_key_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(config_text("http://127.0.0.1:9", "- name: enterprise\n").replace("timeout:", "timeuot:"))
    stderr = io.StringIO()
    assert main(["--config", str(config), "--start", "2026-11-01", "--end", "2026-11-03"], stderr=stderr) == 2
    assert stderr.getvalue().startswith(f"devin-usage-exporter backfill: config error: {config}: api.timeuot")


# --- failures, the upstream's past, interruption ----------------------------------------------------


async def test_points_that_still_fail_are_left_out_counted_and_exit_1_without_the_key(
        simulator: Simulator, tmp_path: Path) -> None:
    # Searches fail with 500s: every usage point (sessions + PRs + searches) fails; consumption does not.
    simulator.faults.update({"status": 500, "paths": ["/v3/enterprise/metrics/searches"]})
    collectors = "{queue: {enabled: false}, active_users: {enabled: false}, organizations: {enabled: false}}"
    result = await run(simulator, tmp_path, "--start", "2026-11-22", "--end", "2026-11-24", "--windows", "24h,7d",
                       "--log-level", "debug", org_sets="- name: enterprise\n", collectors=collectors, retries=2)
    assert result.code == 1
    assert "4 point(s) left out after retries (server_error: 4)" in result.stderr
    assert "left out: org set 'enterprise', collector usage, window 24h at 2026-11-23T00:00:00Z: HTTP 500" in \
        result.stderr
    searches = simulator.requests("/v3/enterprise/metrics/searches")
    assert len(searches) == 4 * 3  # each point asked three times (two retries)
    got = samples_at(result.output)
    assert {name for name, _ in got[D.timestamp()]} == {"devin_consumption_acus", "devin_consumption_acus_by_product"}
    assert V3_TOKEN not in result.stderr and V3_TOKEN not in result.output


async def test_a_range_before_the_enterprise_existed_is_reported_and_its_step_ends_skipped(
        simulator: Simulator, tmp_path: Path) -> None:
    first_day = INCEPTION.replace(hour=0)  # the simulated enterprise's first billing cycle starts at 08:00
    start, end = first_day - timedelta(days=3), first_day + timedelta(days=2)
    result = await run(simulator, tmp_path, "--start", start.date().isoformat(), "--end", end.date().isoformat(),
                       "--windows", "24h", org_sets="- name: enterprise\n", collectors=ONLY_USAGE)
    assert result.code == 0, result.stderr
    assert (f"is before the API's data, which begins at {INCEPTION:%Y-%m-%dT%H:%M:%SZ}, the enterprise's first "
            "billing cycle: 3 step end(s) before it are skipped") in result.stderr
    got = samples_at(result.output)
    assert sorted(got) == [(first_day + timedelta(days=1)).timestamp(), end.timestamp()]
    series = ("devin_usage_sessions", frozenset({("org", "enterprise"), ("window", "24h")}))
    day = first_day + timedelta(days=1)
    # The day the enterprise began counts only what followed INCEPTION; the simulator says so too.
    assert got[day.timestamp()][series] == expected_sessions(
        [], [], int((day - timedelta(days=1)).timestamp()), int(day.timestamp()), now=NOW)["sessions_created_count"]


def test_ctrl_c_leaves_no_output_and_keeps_an_older_one(tmp_path: Path) -> None:
    """A real process and a real SIGINT: the run is cut short while requests are in flight."""
    simulator = subprocess.Popen([sys.executable, "-m", "exporter", "simulate", "--listen", "127.0.0.1:0",
                                  "--v3-token", V3_TOKEN, "--latency", "0.3"], cwd=ROOT, env=subprocess_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert simulator.stdout is not None
        match = re.fullmatch(r"simulator listening on (\S+)\n", simulator.stdout.readline())
        assert match is not None
        config = tmp_path / "c.yaml"
        config.write_text(config_text(match.group(1), "- name: enterprise\n", key=V3_TOKEN, collectors=ONLY_USAGE))
        output = tmp_path / "history.om"
        output.write_text("older history\n")
        child = subprocess.Popen([sys.executable, "-m", "exporter", "backfill", "--config", str(config),
                                  "--start", "2026-10-01", "--end", "2026-11-01", "--output", str(output)],
                                 cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)
        assert child.stderr is not None
        first = child.stderr.readline()  # the estimate: the run has begun asking
        assert "point(s)" in first, first
        child.send_signal(signal.SIGINT)
        _, rest = child.communicate(timeout=20)
        assert child.returncode == 130, rest
        assert "interrupted; no output written" in rest and "Traceback" not in rest
        assert output.read_text() == "older history\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "history.om"]  # no spool, no temp file
    finally:
        simulator.terminate()
        simulator.wait(10)


# --- progress --------------------------------------------------------------------------------------


def test_progress_off_a_terminal_is_a_plain_line_every_few_seconds() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(100, stream, terminal=False, clock=lambda: now[0])
    for i in range(1, 21):
        now[0] = i * 0.5  # 20 points in 10 s
        progress.advance(left_out=i == 3)
    assert stream.getvalue().splitlines() == [
        "backfill: 10/100 points (10%), 1 left out, 2.0 points/s, ETA 45s",
        "backfill: 20/100 points (20%), 1 left out, 2.0 points/s, ETA 40s",
    ]
    assert PLAIN_EVERY == 5.0


def test_progress_on_a_terminal_is_a_bar_with_rate_and_eta() -> None:
    stream = io.StringIO()
    progress = Progress(4, stream, terminal=True)
    for _ in range(2):
        progress.advance()
    progress.close()
    text = stream.getvalue()
    assert "2/4" in text and "point/s" in text and "<" in text  # tqdm's [elapsed<remaining, rate]


async def test_a_terminal_run_draws_the_bar_and_prints_left_out_points_above_it(
        simulator: Simulator, tmp_path: Path) -> None:
    simulator.faults.update({"status": 503, "retry_after": None})
    result = await run(simulator, tmp_path, "--start", "2026-11-23", "--end", "2026-11-24", "--windows", "24h",
                       org_sets="- name: enterprise\n", collectors=ONLY_USAGE, terminal=True)
    assert result.code == 1
    assert "1/1" in result.stderr and "left out: org set 'enterprise'" in result.stderr
    assert result.output == "# EOF\n"  # nothing to write is still a valid, empty exposition


# --- the README and the benchmark ------------------------------------------------------------------


def test_the_readme_backfill_commands_are_flags_the_command_takes() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("\n## Backfilling history\n"):]
    section = section[:section.index("\n## ", 1)]
    blocks = [block.replace("\\\n", " ") for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL)]
    commands = [shlex.split(line) for block in blocks for line in block.splitlines()
                if line.startswith("devin-usage-exporter")]
    assert len(commands) == 2
    for command in commands:
        assert command[:2] == ["devin-usage-exporter", "backfill"]
        build_parser().parse_args(command[2:])
    assert "promtool tsdb create-blocks-from openmetrics history.om ./blocks" in section


def test_the_backfill_benchmark_runs_and_prints_its_figures() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "backfill.py"), "--smoke"], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("# backfill: N=2")
    header = [c.strip() for c in lines[1].strip("|").split("|")]
    row = dict(zip(header, (c.strip() for c in lines[3].strip("|").split("|")), strict=True))
    assert row["days"] == "1" and row["points"] == "16" and float(row["peak_rss_mb"]) > 10
