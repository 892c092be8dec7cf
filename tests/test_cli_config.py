"""The command line's config handling, run as a real process: exit codes, one-line errors, no key leaks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporter import __version__

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config.example.yaml"
KEY = "apk_user_LEAKCHECK_0123456789"
COG = "cog_LEAKCHECK_0123456789"  # a service user's token: API v3
MINIMAL = "org_sets:\n  - name: enterprise\n"


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DEVIN_API_KEY", "DEVIN_EXPORTER_CONFIG")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["DEVIN_API_KEY"] = KEY
    env.update(extra)
    return env


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        env=base_env() if env is None else env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_config_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 2, nothing on stdout, exactly one line on stderr holding `fragments`, no traceback, no key."""
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stderr.endswith("\n"), result.stderr
    (line,) = lines
    assert line.startswith("devin-usage-exporter: config error: "), line
    for fragment in fragments:
        assert fragment in line, line
    assert "Traceback" not in result.stderr
    assert KEY not in result.stderr and KEY not in result.stdout
    assert COG not in result.stderr and COG not in result.stdout
    return line


def test_version_prints_name_and_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout == f"devin-usage-exporter {__version__}\n"
    assert result.stderr == ""


def test_check_config_on_the_example_prints_a_one_line_summary() -> None:
    result = run("--check-config", "--config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    # One summary line; then (SPEC §10) what a set cannot get: consumption takes org_ids or
    # user_ids, not both, so mobile-oncall has none.
    assert lines[1:] == ["note: org set 'mobile-oncall': collector consumption publishes nothing: the API "
                         "cannot filter it by org_ids and user_ids together"]
    assert lines[0].startswith(f"{EXAMPLE}: OK: 3 org set(s), 11 schedule(s)")
    assert "https://api.devin.ai" in lines[0] and "0.0.0.0:9877" in lines[0]
    assert KEY not in result.stdout


def test_check_config_on_the_example_with_a_service_user_token_says_v3() -> None:
    result = run("--check-config", "--config", str(EXAMPLE), env=base_env(DEVIN_API_KEY=COG))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    line, *notes = result.stdout.splitlines()
    assert line.startswith(f"{EXAMPLE}: OK: 3 org set(s), 11 schedule(s)")
    assert ", API v3 https://api.devin.ai, listen 0.0.0.0:9877" in line
    # v3 searches take no user_ids: the set with user_ids gets none, and --check-config says so.
    assert notes == [
        "note: org set 'mobile-oncall': collector usage does not publish devin_usage_searches: "
        "the API cannot filter them by user_ids",
        "note: org set 'mobile-oncall': collector active_users publishes nothing: the API cannot filter it by "
        "user_ids",
        "note: org set 'mobile-oncall': collector consumption publishes nothing: the API cannot filter it by "
        "org_ids and user_ids together"]
    assert COG not in result.stdout


def test_check_config_says_that_discovery_is_on(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("discovery:\n  organizations: true\n")
    result = run("--check-config", "--config", "c.yaml", cwd=tmp_path, env=base_env(DEVIN_API_KEY=COG))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("c.yaml: OK: 0 org set(s), 0 schedule(s) (org set x window), API v3 https://api.devin.ai, "
                             "listen 0.0.0.0:9877; discovery of organizations on\n")


def test_check_config_applies_listen_override(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(MINIMAL)
    result = run("--check-config", "--config", "c.yaml", "--listen", "127.0.0.1:9100", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("c.yaml: OK: ") and "listen 127.0.0.1:9100" in result.stdout


def test_check_config_with_key_file_does_not_print_the_key(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(KEY + "\n")
    (tmp_path / "c.yaml").write_text("api: {api_key_file: key}\n" + MINIMAL)
    result = run("--check-config", "--config", str(tmp_path / "c.yaml"), env=base_env(DEVIN_API_KEY=""))
    assert result.returncode == 0, result.stderr
    assert KEY not in result.stdout + result.stderr


BROKEN = [
    ("api-key-typo", f"api:\n  api_key: {KEY}\n  api_kye: x\n" + MINIMAL, "api.api_kye: ", "did you mean 'api_key'"),
    ("org-id-typo", f"api:\n  api_key: {KEY}\norg_sets:\n  - name: a\n    org_id: [x]\n", "org_sets[0].org_id: ",
     "did you mean 'org_ids'"),
    ("top-level-typo", "pol:\n  interval: 5m\n" + MINIMAL, "pol: ", "did you mean 'poll'"),
    ("bad-duration", "poll:\n  interval: 5 minutes\n" + MINIMAL, "poll.interval: ", "5 minutes"),
    ("short-window", "org_sets:\n  - name: a\n  - name: b\n    windows: [1h, 30s]\n", "org_sets[1].windows[1]: ",
     "1m"),
    ("duplicate-window", "windows: [1h, 24h, 1h]\n" + MINIMAL, "windows[2]: ", "twice"),
    ("duplicate-set", "org_sets:\n  - name: a\n  - name: a\n", "org_sets[1].name: ", "duplicate"),
    ("empty-name", "org_sets:\n  - name: ''\n", "org_sets[0].name: ", "empty"),
    ("no-org-sets", f"api:\n  api_key: {KEY}\n", "org_sets: ", "at least one"),
    ("org-sets-not-list", "org_sets: enterprise\n", "org_sets: ", "must be a list"),
    ("zero-concurrency", f"api:\n  api_key: {KEY}\n  max_concurrency: 0\n" + MINIMAL, "api.max_concurrency: ", "1"),
    ("float-concurrency", "api:\n  max_concurrency: 1.5\n" + MINIMAL, "api.max_concurrency: ", "integer"),
    ("zero-rate", "api:\n  max_requests_per_second: 0\n" + MINIMAL, "api.max_requests_per_second: ", "0"),
    ("negative-retries", "api:\n  retries: -1\n" + MINIMAL, "api.retries: ", "0"),
    ("reserved-label", "org_sets:\n  - name: a\n    labels: {org: x}\n", "org_sets[0].labels.org: ", "exporter"),
    ("invalid-label", "org_sets:\n  - name: a\n    labels: {team-name: x}\n", "org_sets[0].labels.team-name: ",
     "label name"),
    ("label-value-int", "org_sets:\n  - name: a\n    labels: {team: 1}\n", "org_sets[0].labels.team: ", "string"),
    ("both-key-sources", f"api:\n  api_key: {KEY}\n  api_key_file: key\n" + MINIMAL, "api: ", "not both"),
    ("missing-key-file", "api:\n  api_key_file: no-such-file\n" + MINIMAL, "api.api_key_file: ", "no-such-file"),
    ("empty-api-key", "api:\n  api_key: '${EMPTY_VAR}'\n" + MINIMAL, "api.api_key: ", "empty"),
    ("unset-variable", "org_sets:\n  - name: a\n    org_ids: ['${NOT_SET_ANYWHERE}']\n", "org_sets[0].org_ids[0]: ",
     "NOT_SET_ANYWHERE"),
    ("bad-listen", "server:\n  listen: 'host:99999'\n" + MINIMAL, "server.listen: ", "HOST:PORT"),
    ("bad-timezone", "poll:\n  timezone: Mars/Olympus\n" + MINIMAL, "poll.timezone: ", "Mars/Olympus"),
    ("jitter-one", "poll:\n  jitter: 1\n" + MINIMAL, "poll.jitter: ", "less than 1"),
    ("stale-zero", "poll:\n  stale_after: 0\n" + MINIMAL, "poll.stale_after: ", "at least 1"),
    ("bad-base-url", "api:\n  base_url: ftp://api.devin.ai\n" + MINIMAL, "api.base_url: ", "http"),
    ("yaml-syntax", f"api:\n  api_key: {KEY}\norg_sets: [\n  {{name: a}}\n  {{name: b}}\n", ": line 5", "YAML"),
    ("yaml-duplicate-key", MINIMAL + "org_sets: []\n", ": line 3", "duplicate key 'org_sets'"),
    ("control-character", "org_sets:\n  - name: a\x07\n", ": invalid YAML", "special characters"),
    ("top-level-list", "- name: a\n", ".yaml: must be a mapping", "list"),
    ("empty-file", "# nothing here\n", ".yaml: the file is empty", "config.example.yaml"),
    ("key-of-unknown-shape", "api:\n  api_key: sk-LEAK0123456789\n" + MINIMAL, "api.api_key: ",
     "service user token (cog_..."),
    ("v3-with-apk-key", "api:\n  version: v3\n" + MINIMAL, "api.version: ", "personal API key"),
    ("v2-with-cog-token", f"api:\n  version: v2\n  api_key: {COG}\n" + MINIMAL, "api.version: ",
     "service user token"),
    ("bad-api-version", "api:\n  version: v4\n" + MINIMAL, "api.version: ", "auto, v3 or v2"),
    ("collector-typo", "collectors:\n  consumptoin: {}\n" + MINIMAL, "collectors.consumptoin: ",
     "did you mean 'consumption'"),
    ("queue-on-v2", "collectors:\n  queue:\n    enabled: true\n" + MINIMAL, "collectors.queue.enabled: ",
     "needs API v3"),
    ("active-users-on-v2", "collectors:\n  active_users: {enabled: true}\n" + MINIMAL,
     "collectors.active_users.enabled: ", "needs API v3"),
    ("window-on-organizations", "collectors:\n  organizations: {windows: [1h]}\n" + MINIMAL,
     "collectors.organizations.windows: ", "unknown key"),
    ("short-collector-interval", "collectors:\n  queue: {interval: 100ms}\n" + MINIMAL, "collectors.queue.interval: ",
     "at least 1s"),
    ("discovery-without-organizations", "collectors:\n  organizations: {enabled: false}\n"
     "discovery:\n  organizations: true\n", "discovery.organizations: ", "organizations collector"),
    ("discovery-org-id-label", "discovery:\n  organizations: true\n  labels: {org_id: x}\n",
     "discovery.labels.org_id: ", "exporter"),
    ("reserved-label-product", "org_sets:\n  - name: a\n    labels: {product: x}\n", "org_sets[0].labels.product: ",
     "exporter"),
    ("lifecycle-not-bool", "server:\n  enable_lifecycle: 'yes'\n" + MINIMAL, "server.enable_lifecycle: ",
     "true or false"),
]


@pytest.mark.parametrize(("text", "where", "what"), [case[1:] for case in BROKEN], ids=[case[0] for case in BROKEN])
def test_broken_config_exits_2_with_one_line_naming_file_and_key(text: str, where: str, what: str,
                                                                 tmp_path: Path) -> None:
    (tmp_path / "key").write_text(KEY + "\n")
    config = tmp_path / "broken.yaml"
    config.write_text(text)
    result = run("--check-config", "--config", str(config), env=base_env(EMPTY_VAR=""))
    line = assert_config_error(result, str(config), where, what)
    assert line.startswith(f"devin-usage-exporter: config error: {config}")


def test_missing_api_key_env_exits_2(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(MINIMAL)
    env = base_env()
    del env["DEVIN_API_KEY"]
    result = run("--check-config", "--config", "c.yaml", env=env, cwd=tmp_path)
    assert_config_error(result, "c.yaml: api.api_key: ", "DEVIN_API_KEY")


def test_config_defaults_to_devin_exporter_config_variable(tmp_path: Path) -> None:
    config = tmp_path / "from-env.yaml"
    config.write_text(MINIMAL)
    (tmp_path / "config.yaml").write_text("this: is not the file in use\n")
    result = run("--check-config", env=base_env(DEVIN_EXPORTER_CONFIG=str(config)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{config}: OK: ")


def test_config_variable_pointing_at_missing_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    result = run("--check-config", env=base_env(DEVIN_EXPORTER_CONFIG=str(missing)), cwd=tmp_path)
    assert_config_error(result, str(missing), "cannot read config")


def test_config_flag_beats_the_variable(tmp_path: Path) -> None:
    (tmp_path / "flag.yaml").write_text(MINIMAL)
    result = run("--check-config", "--config", "flag.yaml", cwd=tmp_path,
                 env=base_env(DEVIN_EXPORTER_CONFIG=str(tmp_path / "nowhere.yaml")))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("flag.yaml: OK: ")


def test_config_defaults_to_config_yaml_in_working_directory(tmp_path: Path) -> None:
    result = run("--check-config", cwd=tmp_path)
    assert_config_error(result, "config.yaml: cannot read config")
    (tmp_path / "config.yaml").write_text(MINIMAL)
    result = run("--check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config.yaml: OK: ")


def test_missing_config_file_exits_2_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "absent" / "exporter.yaml"
    result = run("--check-config", "--config", str(missing))
    assert_config_error(result, str(missing), "cannot read config")


@pytest.mark.parametrize("listen", ["9877", "host:99999", "host:port"])
def test_bad_listen_flag_exits_2(listen: str, tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(MINIMAL)
    result = run("--check-config", "--config", "c.yaml", "--listen", listen, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "--listen" in result.stderr and repr(listen) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["--bogus"], ["--log-level", "loud"], ["--check-config", "--once"]],
                         ids=["unknown-flag", "bad-log-level", "exclusive-modes"])
def test_bad_flags_exit_2(args: list[str], tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(MINIMAL)
    result = run(*args, "--config", "c.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "usage: devin-usage-exporter" in result.stderr
    assert "Traceback" not in result.stderr
