"""The real command line as a subprocess, against the simulator as a subprocess, over real sockets.

Every wait has a deadline: output is read by background threads and matched with a timeout, and
HTTP endpoints are polled until a condition holds. Every process is killed in teardown.
"""

from __future__ import annotations

import http.client as http_client
import json
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import pytest
from helpers import USAGE_METRICS, ExporterProcess, labels, parse_samples, run_cli, subprocess_env

SIM_KEY: Final = "apk_user_simulator"
USAGE: Final = tuple(USAGE_METRICS.values())
LISTENING_RE: Final = re.compile(r"\bmsg=listening url=(http://\S+)")


class Proc(ExporterProcess):
    """An exporter child whose output is waited on by stream; `env` adds to the usual child environment."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(*args, env=subprocess_env(**(env or {})))

    def wait_for(self, stream: str, pattern: re.Pattern[str] | str, timeout: float = 10.0) -> re.Match[str]:
        """The first line of `stream` matching `pattern`; fails after `timeout` or if the process exits."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[stream]:
                    if (match := regex.search(line)) is not None:
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or (
                    self.popen.poll() is not None and not any(r.is_alive() for r in self._readers)
                ):
                    raise AssertionError(
                        f"no {stream} line matching {regex.pattern!r} within {timeout}s "
                        f"(exit code {self.popen.poll()}); output:\n{self.output()}"
                    )
                self._cond.wait(min(left, 0.1))

    def output(self) -> str:
        with self._cond:
            return "\n".join(["--- stdout", *self.lines["stdout"], "--- stderr", *self.lines["stderr"]])

    def stderr_lines(self) -> list[str]:
        with self._cond:
            return list(self.lines["stderr"])

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        code = self.popen.wait(timeout)
        self._join_readers()
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)
        self._join_readers()


def http(method: str, url: str, body: object | None = None, timeout: float = 5.0) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"} if data else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def poll_until(check: Callable[[], object], *, timeout: float = 10.0, what: str = "condition") -> object:
    """Call `check` every 50 ms until it returns something truthy (returned); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (OSError, urllib.error.URLError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def simulator() -> Iterator[str]:
    """`python -m exporter simulate` on a free loopback port; yields its base URL."""
    proc = Proc("simulate", "--listen", "127.0.0.1:0")
    try:
        url = proc.wait_for("stdout", r"simulator listening on (http://127\.0\.0\.1:\d+)", timeout=15).group(
            1
        )
        yield url
    finally:
        proc.signal(signal.SIGTERM)
        try:
            proc.wait(5)
        finally:
            proc.kill()


@pytest.fixture
def sim(simulator: str) -> str:
    """The shared simulator with its faults and recorded requests reset for this test."""
    assert http("DELETE", f"{simulator}/-/faults")[0] == 200
    assert http("DELETE", f"{simulator}/-/requests")[0] == 200
    return simulator


@pytest.fixture
def procs() -> Iterator[Callable[..., Proc]]:
    """Start exporter processes; whatever is still running at teardown is killed."""
    started: list[Proc] = []

    def start(*args: str) -> Proc:
        proc = Proc(*args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


ORG_SETS: Final = """\
  - name: enterprise
  - name: platform
    org_ids: [org-123, org-456]
    labels: {team: platform}
  - name: mobile-oncall
    org_ids: [org-789]
    user_ids: [user-1, user-2]
    windows: [24h, today, billing_cycle]
"""
EXPECTED_SCHEDULES: Final = [
    ("enterprise", "1h"),
    ("enterprise", "24h"),
    ("platform", "1h"),
    ("platform", "24h"),
    ("mobile-oncall", "24h"),
    ("mobile-oncall", "today"),
    ("mobile-oncall", "billing_cycle"),
]


def write_config(
    path: Path,
    base_url: str,
    org_sets: str = ORG_SETS,
    *,
    retries: int = 0,
    timeout: str = "10s",
    extra_poll: str = "",
) -> Path:
    path.write_text(
        f"""\
api:
  base_url: {base_url}
  api_key: {SIM_KEY}
  timeout: {timeout}
  retries: {retries}
  max_concurrency: 8
  max_requests_per_second: 1000
poll:
  interval: 1h
  jitter: 0
{extra_poll}windows: [1h, 24h]
collectors: {{organizations: {{enabled: false}}, consumption: {{enabled: false}}}}  # release 0.1's: usage only
org_sets:
{org_sets}server:
  listen: 127.0.0.1:0
""",
        encoding="utf-8",
    )
    return path


def scrape(base: str) -> str:
    status, text = http("GET", base + "metrics")
    assert status == 200
    return text


def start_daemon(procs: Callable[..., Proc], config: Path, *extra: str) -> tuple[Proc, str]:
    proc = procs("--config", str(config), *extra)
    url = proc.wait_for("stderr", LISTENING_RE, timeout=15).group(1)
    assert url.startswith("http://127.0.0.1:") and url.endswith("/")
    return proc, url


def usage_labels(text: str) -> set[tuple[str, str]]:
    samples = parse_samples(text)
    return {(dict(lbls)["org"], dict(lbls)["window"]) for name in USAGE for lbls in samples.get(name, {})}


# --------------------------------------------------------------------------------------------
# --once


def test_once_prints_every_org_set_and_window_and_exits_0(sim: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", sim)
    result = run_cli("--config", str(config), "--once", timeout=30)
    assert result.returncode == 0, result.stderr
    samples = parse_samples(result.stdout)
    for name in USAGE:
        got = {(dict(lbls)["org"], dict(lbls)["window"]) for lbls in samples[name]}
        assert got == set(EXPECTED_SCHEDULES), name
    assert all(v > 0 for v in samples["devin_usage_sessions"].values())
    assert samples["devin_usage_sessions"].keys() >= {labels(org="platform", window="1h", team="platform")}
    assert samples["devin_up"] == {labels(org=o): 1.0 for o in ("enterprise", "platform", "mobile-oncall")}
    _, recorded = http("GET", f"{sim}/-/requests")
    assert len(json.loads(recorded)) == len(EXPECTED_SCHEDULES)


def test_once_exits_1_and_still_prints_devin_up_0_when_the_api_fails(sim: str, tmp_path: Path) -> None:
    assert http("POST", f"{sim}/-/faults", {"status": 500})[0] == 200
    config = write_config(tmp_path / "config.yaml", sim, retries=0)
    result = run_cli("--config", str(config), "--once", timeout=30)
    assert result.returncode == 1, result.stderr
    samples = parse_samples(result.stdout)
    assert samples["devin_up"] == {labels(org=o): 0.0 for o in ("enterprise", "platform", "mobile-oncall")}
    assert not any(name in samples for name in USAGE)
    errors = samples["devin_exporter_api_errors_total"]
    assert errors[labels(collector="usage", org="enterprise", reason="server_error")] == 2.0
    assert "level=warning" in result.stderr and "org_set=" in result.stderr
    assert SIM_KEY not in result.stdout + result.stderr


def test_log_format_json_writes_one_json_object_per_line(sim: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", sim)
    result = run_cli(
        "--config", str(config), "--once", "--log-format", "json", "--log-level", "debug", timeout=30
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) >= len(EXPECTED_SCHEDULES)  # at least one debug line per poll
    for line in lines:
        event = json.loads(line)
        assert isinstance(event, dict)
        assert event["level"] in ("debug", "info", "warning", "error")
        assert isinstance(event["msg"], str) and event["msg"]
    assert SIM_KEY not in result.stderr


# --------------------------------------------------------------------------------------------
# the daemon


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_exits_0_within_5s_even_with_a_request_hanging(
    sim: str, tmp_path: Path, procs: Callable[..., Proc], signum: int
) -> None:
    assert http("POST", f"{sim}/-/faults", {"hang": True})[0] == 200
    config = write_config(tmp_path / "config.yaml", sim, timeout="60s")
    proc, url = start_daemon(procs, config)

    def in_flight() -> bool:
        recorded = json.loads(http("GET", f"{sim}/-/requests")[1])
        return len(recorded) == len(EXPECTED_SCHEDULES) and all(r["status"] is None for r in recorded)

    poll_until(in_flight, what="every first poll to hang in the simulator")
    assert http("GET", url + "healthz")[0] == 200
    assert http("GET", url + "readyz")[0] == 503
    # And a scraper's idle keep-alive connection, as Prometheus holds one, must not delay the stop.
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    keep_alive = http_client.HTTPConnection(host, int(port), timeout=10)
    try:
        keep_alive.request("GET", "/metrics")
        response = keep_alive.getresponse()
        assert response.status == 200 and b"devin_up" in response.read()

        started = time.monotonic()
        proc.signal(signum)
        code = proc.wait(timeout=10)
        elapsed = time.monotonic() - started
    finally:
        keep_alive.close()
    assert code == 0, proc.output()
    assert elapsed < 5.0, f"took {elapsed:.2f}s to stop"
    assert "Traceback" not in proc.output()


def test_sighup_reloads_new_org_sets_and_a_broken_config_keeps_the_old_one(
    sim: str, tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    config = write_config(tmp_path / "config.yaml", sim)
    proc, url = start_daemon(procs, config)
    poll_until(lambda: http("GET", url + "readyz")[0] == 200, what="/readyz 200")
    poll_until(
        lambda: usage_labels(scrape(url)) == set(EXPECTED_SCHEDULES), what="every first poll published"
    )

    write_config(config, sim, ORG_SETS + "  - name: newcomer\n    org_ids: [org-d4e5f6]\n    windows: [7d]\n")
    proc.signal(signal.SIGHUP)
    # devin_up{org="newcomer"} 0 shows at once; its usage series follow its first poll.
    poll_until(lambda: ("newcomer", "7d") in usage_labels(scrape(url)), what="the new org set's series")
    samples = parse_samples(scrape(url))
    assert samples["devin_usage_sessions"][labels(org="newcomer", window="7d")] > 0
    assert samples["devin_up"][labels(org="newcomer")] == 1.0
    assert samples["devin_exporter_config_last_reload_successful"] == {labels(): 1.0}
    reloaded_at = samples["devin_exporter_config_last_reload_success_timestamp_seconds"][labels()]

    # A typo: the running config stays, the failure is visible as a metric and one log line.
    config.write_text(config.read_text().replace("  jitter: 0\n", "  jitter: 0\n  intervall: 5m\n"))
    errors_before = [line for line in proc.stderr_lines() if "level=error" in line]
    proc.signal(signal.SIGHUP)
    poll_until(
        lambda: parse_samples(scrape(url))["devin_exporter_config_last_reload_successful"] == {labels(): 0.0},
        what="the failed reload to show",
    )
    line = proc.wait_for("stderr", r"^.*level=error .*poll\.intervall.*$", timeout=5).group(0)
    assert str(config) in line and "did you mean" in line
    errors = [line for line in proc.stderr_lines() if "level=error" in line]
    assert len(errors) - len(errors_before) == 1, errors
    assert proc.popen.poll() is None
    after = parse_samples(scrape(url))
    assert labels(org="newcomer", window="7d") in after["devin_usage_sessions"]
    assert after["devin_exporter_config_last_reload_success_timestamp_seconds"][labels()] == reloaded_at
    assert http("GET", url + "healthz")[0] == 200

    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0, proc.output()
    assert SIM_KEY not in proc.output()


def test_demo_serves_simulated_usage_on_loopback_and_stops_on_sigterm(procs: Callable[..., Proc]) -> None:
    proc = procs("--demo", "--listen", "127.0.0.1:0")
    url = proc.wait_for("stdout", r"(http://127\.0\.0\.1:\d+/)", timeout=15).group(1)

    def sessions() -> bool:
        values = parse_samples(scrape(url)).get("devin_usage_sessions", {})
        return bool(values) and all(v > 0 for v in values.values())

    poll_until(sessions, timeout=15, what="non-zero devin_usage_sessions from the demo")
    assert http("GET", url + "healthz")[0] == 200
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0, proc.output()
