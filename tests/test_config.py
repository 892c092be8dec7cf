"""Every validation rule of the config file (SPEC §3, §9-§11, §13): what is accepted, how rejections read."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NoReturn
from zoneinfo import ZoneInfo

import pytest

from exporter import config as config_module
from exporter import config_schema
from exporter.config import (
    COLLECTOR_NAMES,
    DEFAULT_BASE_URL,
    RESERVED_LABELS,
    V3_ONLY_COLLECTORS,
    WINDOWED_COLLECTORS,
    ApiSettings,
    CollectorSettings,
    Config,
    ConfigError,
    DiscoverySettings,
    OrgSet,
    PollSettings,
    ServerSettings,
    Window,
    default_collectors,
    load_config,
    parse_config,
)
from exporter.shard import Shard

KEY = "apk_user_LEAKCHECK_0123456789"
ENV = {"DEVIN_API_KEY": KEY}
COG = "cog_LEAKCHECK_0123456789"  # a service user's token: API v3
V3 = {"DEVIN_API_KEY": COG}
MINIMAL = "org_sets:\n  - name: enterprise\n"
EXAMPLE = Path(__file__).resolve().parents[1] / "config.example.yaml"
LA = ZoneInfo("America/Los_Angeles")
UTC = ZoneInfo("UTC")


def parse(text: str, base_dir: Path, env: dict[str, str] | None = None) -> Config:
    return parse_config(textwrap.dedent(text), "test.yaml", env=ENV if env is None else env, base_dir=base_dir)


def reject(text: str, base_dir: Path, path: str, *fragments: str, env: dict[str, str] | None = None) -> str:
    """Parse `text`, expect a ConfigError that starts with `test.yaml: <path>: ` and holds `fragments`."""
    with pytest.raises(ConfigError) as info:
        parse(text, base_dir, env)
    message = str(info.value)
    prefix = f"test.yaml: {path}: " if path else "test.yaml: "
    assert message.startswith(prefix), message
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message and "\r" not in message, message
    assert KEY not in message and KEY not in repr(info.value)
    assert COG not in message and COG not in repr(info.value)
    return message


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


# --- a valid config and its defaults ------------------------------------------------------------


def test_minimal_config_gets_every_default(tmp_path: Path) -> None:
    config = parse(MINIMAL, tmp_path)
    assert config.source == "test.yaml"
    assert config.api.base_url == "https://api.devin.ai"
    assert config.api.api_key.reveal() == KEY
    assert config.api.api_key_file is None
    assert config.api.timeout == 30.0
    assert config.api.max_concurrency == 4
    assert config.api.max_requests_per_second == 2.0
    assert config.api.retries == 3
    assert config.poll.interval == 300.0
    assert config.poll.jitter == 0.1
    assert config.poll.delay == 0.0
    assert config.poll.stale_after == 3
    assert config.poll.timezone == "UTC"
    assert config.poll.zone == ZoneInfo("UTC")
    assert [w.name for w in config.windows] == ["1h", "24h", "7d", "30d"]
    assert [w.range_seconds for w in config.windows] == [3600, 86400, 7 * 86400, 30 * 86400]
    assert all(w.kind == "range" and w.interval == 300.0 for w in config.windows)
    assert config.server.host == "0.0.0.0"
    assert config.server.port == 9877
    assert config.server.listen == "0.0.0.0:9877"
    assert config.server.web_config_file is None
    (org_set,) = config.org_sets
    assert org_set.name == "enterprise"
    assert org_set.org_ids == () and org_set.user_ids == () and org_set.labels == ()
    assert org_set.windows == config.windows


def test_empty_sections_mean_defaults(tmp_path: Path) -> None:
    config = parse("api:\npoll:\nserver:\n" + MINIMAL, tmp_path)
    assert config == parse(MINIMAL, tmp_path)


def test_summary_is_one_line_naming_the_file(tmp_path: Path) -> None:
    summary = parse(MINIMAL, tmp_path).summary()
    assert summary.startswith("test.yaml: OK: 1 org set(s), 4 schedule(s)")
    assert "listen 0.0.0.0:9877" in summary
    assert "\n" not in summary and KEY not in summary


def test_full_config_values_are_typed(tmp_path: Path) -> None:
    config = parse(
        """\
        api:
          base_url: http://localhost:8080/
          timeout: 10s
          max_concurrency: 8
          max_requests_per_second: 0.5
          retries: 0
        poll:
          interval: 1m
          jitter: 0
          delay: 2m
          stale_after: 1
          timezone: America/Los_Angeles
        org_sets:
          - name: platform
            org_ids: [org-1, org-2]
            user_ids: [user-1]
            labels: {team: platform, _tier: gold}
        server:
          listen: 127.0.0.1:9100
        """,
        tmp_path,
    )
    assert config.api.base_url == "http://localhost:8080"  # trailing slash dropped
    assert (config.api.timeout, config.api.max_concurrency) == (10.0, 8)
    assert (config.api.max_requests_per_second, config.api.retries) == (0.5, 0)
    assert config.poll == config_module.PollSettings(60.0, 0.0, 120.0, 1, "America/Los_Angeles")
    (org_set,) = config.org_sets
    assert org_set.org_ids == ("org-1", "org-2") and org_set.user_ids == ("user-1",)
    assert org_set.labels == (("_tier", "gold"), ("team", "platform"))  # sorted by name
    assert all(w.interval == 60.0 for w in org_set.windows)
    assert (config.server.host, config.server.port) == ("127.0.0.1", 9100)


# --- config.example.yaml ------------------------------------------------------------------------


def test_example_config_loads_with_its_documented_sets_and_windows() -> None:
    config = load_config(EXAMPLE, env=ENV)
    assert config.source == str(EXAMPLE)
    assert config.api.api_key.reveal() == KEY
    assert [w.name for w in config.windows] == ["1h", "24h", "7d", "30d"]
    assert [w.interval for w in config.windows] == [300.0, 300.0, 300.0, 1800.0]
    sets = {s.name: s for s in config.org_sets}
    assert list(sets) == ["enterprise", "platform", "mobile-oncall"]
    assert sets["enterprise"].org_ids == () and sets["enterprise"].windows == config.windows
    assert sets["platform"].org_ids == ("org-123", "org-456")
    assert sets["platform"].labels == (("team", "platform"),)
    assert sets["mobile-oncall"].org_ids == ("org-789",)
    assert sets["mobile-oncall"].user_ids == ("user-1", "user-2")
    assert [(w.name, w.kind) for w in sets["mobile-oncall"].windows] == [
        ("today", "today"), ("24h", "range"), ("billing_cycle", "billing_cycle")]


def test_example_config_values_are_the_defaults() -> None:
    config = load_config(EXAMPLE, env=ENV)
    default = parse_config(MINIMAL, env=ENV)
    assert config.api == default.api
    assert config.poll == default.poll
    assert config.server == default.server


def test_example_config_needs_the_api_key_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE, env={})
    assert str(info.value) == f"{EXAMPLE}: api.api_key: environment variable DEVIN_API_KEY is not set"


ACCEPTED_KEYS = sorted({
    key
    for name in ("_TOP_KEYS", "_API_KEYS", "_POLL_KEYS", "_WINDOW_KEYS", "_ORG_SET_KEYS", "_SERVER_KEYS")
    for key in getattr(config_module, name)
})


@pytest.mark.parametrize("key", ACCEPTED_KEYS)
def test_example_documents_every_accepted_key(key: str) -> None:
    # A key may be documented commented out (api_key_file: exactly one of the two key sources).
    assert re.search(rf"(?<![\w]){key}\s*:", EXAMPLE.read_text()), f"{key} is not in {EXAMPLE.name}"


# --- ${VAR} expansion ---------------------------------------------------------------------------


def test_env_vars_are_expanded_in_every_string(tmp_path: Path) -> None:
    env = {**ENV, "HOST": "devin.example.com", "ORG": "org-9", "TEAM": "infra", "ZONE": "Europe/Paris"}
    config = parse(
        """\
        api: {base_url: "https://${HOST}/v2"}
        poll: {timezone: "${ZONE}"}
        windows: ["${WIN:-2h}"]
        org_sets:
          - name: set-${ORG}-x
            org_ids: ["${ORG}", plain]
            labels: {team: "${TEAM}"}
        """,
        tmp_path,
        env,
    )
    assert config.api.base_url == "https://devin.example.com/v2"
    assert config.poll.timezone == "Europe/Paris"
    assert config.windows[0].name == "2h"
    assert config.org_sets[0].name == "set-org-9-x"
    assert config.org_sets[0].org_ids == ("org-9", "plain")
    assert config.org_sets[0].labels == (("team", "infra"),)


def test_env_default_used_only_when_variable_unset_or_empty(tmp_path: Path) -> None:
    text = 'org_sets: [{name: "${SET:-fallback}"}]'
    assert parse(text, tmp_path).org_sets[0].name == "fallback"
    assert parse(text, tmp_path, {**ENV, "SET": "given"}).org_sets[0].name == "given"
    # As in the shell, `:-` also replaces an empty value.
    assert parse(text, tmp_path, {**ENV, "SET": ""}).org_sets[0].name == "fallback"


def test_env_empty_default_is_allowed(tmp_path: Path) -> None:
    config = parse('org_sets: [{name: "a${SUFFIX:-}", labels: {x: "${NONE:-}"}}]', tmp_path)
    assert config.org_sets[0].name == "a"
    assert config.org_sets[0].labels == (("x", ""),)


def test_api_key_taken_from_env_expansion(tmp_path: Path) -> None:
    config = parse("api: {api_key: '${MY_KEY}'}\n" + MINIMAL, tmp_path, {"MY_KEY": "apk_user_other"})
    assert config.api.api_key.reveal() == "apk_user_other"


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("api: {base_url: '${NOPE_VAR}'}\n" + MINIMAL, "api.base_url"),
        ("org_sets:\n  - name: a\n  - name: b\n    org_ids: [x, '${NOPE_VAR}']\n", "org_sets[1].org_ids[1]"),
        ("org_sets:\n  - name: a\n    labels: {team: 'x-${NOPE_VAR}'}\n", "org_sets[0].labels.team"),
        ("windows: [1h, {range: '${NOPE_VAR}'}]\n" + MINIMAL, "windows[1].range"),
    ],
)
def test_unset_env_var_rejected_naming_key_path_and_variable(text: str, path: str, tmp_path: Path) -> None:
    reject(text, tmp_path, path, "environment variable NOPE_VAR is not set")


# --- the API key --------------------------------------------------------------------------------


def test_api_key_from_env_when_api_section_has_no_key(tmp_path: Path) -> None:
    config = parse("api: {timeout: 5s}\n" + MINIMAL, tmp_path)
    assert config.api.api_key.reveal() == KEY


def test_api_key_in_file_wins_over_environment_default(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("apk_user_fromfile")
    config = parse("api: {api_key_file: key}\n" + MINIMAL, tmp_path)
    assert config.api.api_key.reveal() == "apk_user_fromfile"


def test_missing_api_key_rejected(tmp_path: Path) -> None:
    reject(MINIMAL, tmp_path, "api.api_key", "missing", "DEVIN_API_KEY", env={})


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_api_key_env_default_rejected(value: str, tmp_path: Path) -> None:
    reject(MINIMAL, tmp_path, "api.api_key", "missing", env={"DEVIN_API_KEY": value})


@pytest.mark.parametrize("value", ["", "  \t "])
def test_api_key_expanding_to_empty_rejected(value: str, tmp_path: Path) -> None:
    reject("api: {api_key: '${DEVIN_API_KEY}'}\n" + MINIMAL, tmp_path, "api.api_key", "empty",
           env={"DEVIN_API_KEY": value})


def test_literal_empty_api_key_rejected(tmp_path: Path) -> None:
    reject("api: {api_key: ''}\n" + MINIMAL, tmp_path, "api.api_key", "empty")


@pytest.mark.parametrize("value", ["null", "[a, b]", "{a: b}"])
def test_api_key_that_is_not_a_string_rejected(value: str, tmp_path: Path) -> None:
    reject(f"api: {{api_key: {value}}}\n" + MINIMAL, tmp_path, "api.api_key", "must be a string")


def test_both_api_key_and_api_key_file_rejected(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("apk_user_fromfile")
    reject(f"api: {{api_key: {KEY}, api_key_file: key}}\n" + MINIMAL, tmp_path, "api",
           "api_key", "api_key_file", "not both")


def test_api_key_file_read_with_whitespace_stripped(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("  \n apk_user_fromfile \n\n")
    config = parse("api: {api_key_file: key}\n" + MINIMAL, tmp_path)
    assert config.api.api_key.reveal() == "apk_user_fromfile"
    assert config.api.api_key_file == "key"


def test_api_key_file_absolute_path(tmp_path: Path) -> None:
    (tmp_path / "abs-key").write_text("apk_user_abs\n")
    config = parse(f"api: {{api_key_file: '{tmp_path / 'abs-key'}'}}\n" + MINIMAL, tmp_path / "elsewhere")
    assert config.api.api_key.reveal() == "apk_user_abs"


def test_api_key_file_is_relative_to_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "etc" / "exporter"
    folder.mkdir(parents=True)
    (folder / "secret").write_text("apk_user_relative\n")
    (folder / "config.yaml").write_text("api:\n  api_key_file: secret\n" + MINIMAL)
    (tmp_path / "secret").write_text("apk_user_WRONG_FOLDER\n")  # the working directory's file must not win
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("etc/exporter/config.yaml"), env={})
    assert config.api.api_key.reveal() == "apk_user_relative"


def test_missing_api_key_file_rejected(tmp_path: Path) -> None:
    message = reject("api: {api_key_file: no-such-key}\n" + MINIMAL, tmp_path, "api.api_key_file",
                     "cannot read", "no-such-key")
    assert str(tmp_path / "no-such-key") in message


@pytest.mark.parametrize("content", ["", " \n\t\n"])
def test_empty_api_key_file_rejected(content: str, tmp_path: Path) -> None:
    (tmp_path / "key").write_text(content)
    reject("api: {api_key_file: key}\n" + MINIMAL, tmp_path, "api.api_key_file", "empty")


def test_api_key_file_that_is_a_directory_rejected(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    reject("api: {api_key_file: keys}\n" + MINIMAL, tmp_path, "api.api_key_file", "cannot read")


def test_api_key_file_not_utf8_rejected(tmp_path: Path) -> None:
    (tmp_path / "key").write_bytes(b"\xff\xfe\xfa")
    reject("api: {api_key_file: key}\n" + MINIMAL, tmp_path, "api.api_key_file", "UTF-8")


def test_api_key_file_path_with_nul_byte_rejected_cleanly(tmp_path: Path) -> None:
    reject('api: {api_key_file: "a\\0b"}\n' + MINIMAL, tmp_path, "api.api_key_file", "cannot read")


def test_empty_api_key_file_name_rejected(tmp_path: Path) -> None:
    reject("api: {api_key_file: ''}\n" + MINIMAL, tmp_path, "api.api_key_file", "must not be empty")


# --- the key never leaks ------------------------------------------------------------------------


def test_api_key_not_in_repr_str_or_format_of_config(tmp_path: Path) -> None:
    config = parse(f"api: {{api_key: {KEY}}}\n" + MINIMAL, tmp_path)
    assert config.api.api_key.reveal() == KEY
    for text in (repr(config), str(config), format(config), f"{config!r}", repr(config.api), str(config.api),
                 repr(config.api.api_key), str(config.api.api_key), f"{config.api.api_key}",
                 f"{config.api.api_key:>40}", f"{config.api.api_key} {config.api.api_key!r}"):
        assert KEY not in text
    assert "***" in repr(config)


LATER_MISTAKES = [
    ("api: {{api_key: {key}, retries: -1}}\n" + MINIMAL, "api.retries"),
    ("api: {{api_key: {key}, api_kye: x}}\n" + MINIMAL, "api.api_kye"),
    ("api: {{api_key: {key}}}\norg_sets: [{{name: a, labels: {{org: x}}}}]\n", "org_sets[0].labels.org"),
    ("api: {{api_key: {key}}}\n" + MINIMAL + "server: {{listen: nowhere}}\n", "server.listen"),
    ("api: {{api_key: {key}}}\norg_sets: [{{name: a}}, {{name: a}}]\n", "org_sets[1].name"),
    ("api: {{api_key: {key}}}\n", "org_sets"),
    ("api: {{api_key: '${{DEVIN_API_KEY}}', timeout: 5}}\n" + MINIMAL, "api.timeout"),
    ("api: {{api_key_file: keyfile, max_concurrency: 0}}\n" + MINIMAL, "api.max_concurrency"),
    ("api: {{api_key_file: keyfile}}\nwindows: [1h, 1h]\n" + MINIMAL, "windows[1]"),
]


@pytest.mark.parametrize(("template", "path"), LATER_MISTAKES)
def test_api_key_never_in_error_message(template: str, path: str, tmp_path: Path) -> None:
    (tmp_path / "keyfile").write_text(KEY + "\n")
    reject(template.format(key=KEY), tmp_path, path)  # reject() asserts the key is absent


# --- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h30m", 5400), ("7d", 7 * 86400), ("2w", 14 * 86400), ("1y", 365 * 86400),
     ("500ms", 0.5), ("1d12h", 129600), ("1h0m30s", 3630), ("0s", 0), ("0", 0), ("1m500ms", 60.5)],
)
def test_duration_syntax_accepted(text: str, seconds: float, tmp_path: Path) -> None:
    config = parse(f"poll: {{delay: '{text}'}}\n" + MINIMAL, tmp_path)
    assert config.poll.delay == pytest.approx(seconds)


BAD_DURATIONS = ["5 minutes", "", "5", 5, 1.5, "1h 30m", "5M", "-5m", "1.5h", "30m1h", "m", "5min", " 5m", True]


@pytest.mark.parametrize("value", BAD_DURATIONS, ids=repr)
def test_bad_duration_rejected_in_poll(value: object, tmp_path: Path) -> None:
    reject(f"poll: {{delay: {json.dumps(value)}}}\n" + MINIMAL, tmp_path, "poll.delay")


@pytest.mark.parametrize("value", BAD_DURATIONS, ids=repr)
def test_bad_duration_rejected_in_set_window(value: object, tmp_path: Path) -> None:
    text = f"org_sets:\n  - name: a\n  - name: b\n  - name: c\n    windows: [{json.dumps(value)}, 1h]\n"
    reject(text, tmp_path, "org_sets[2].windows[0]")


@pytest.mark.parametrize(("key", "value"), [("interval", "5 minutes"), ("timeout", "30"), ("interval", 300)])
def test_bad_duration_names_its_key(key: str, value: object, tmp_path: Path) -> None:
    section = "api" if key == "timeout" else "poll"
    reject(f"{section}: {{{key}: {json.dumps(value)}}}\n" + MINIMAL, tmp_path, f"{section}.{key}",
           "is not a duration")


@pytest.mark.parametrize("value", ["0s", "0", "500ms"])
def test_poll_interval_below_one_second_rejected(value: str, tmp_path: Path) -> None:
    reject(f"poll: {{interval: '{value}'}}\n" + MINIMAL, tmp_path, "poll.interval", "at least 1s")


@pytest.mark.parametrize("value", ["0s", "0"])
def test_zero_timeout_rejected(value: str, tmp_path: Path) -> None:
    reject(f"api: {{timeout: '{value}'}}\n" + MINIMAL, tmp_path, "api.timeout", "greater than 0")


def test_sub_second_timeout_accepted(tmp_path: Path) -> None:
    assert parse("api: {timeout: 500ms}\n" + MINIMAL, tmp_path).api.timeout == 0.5


# --- windows ------------------------------------------------------------------------------------


def test_window_kinds_and_intervals(tmp_path: Path) -> None:
    config = parse(
        "windows: [90m, today, month_to_date, billing_cycle, {range: 30d, interval: 30m},"
        " {range: 1w}]\npoll: {interval: 10m}\n" + MINIMAL,
        tmp_path,
    )
    assert config.windows == (
        Window("90m", "range", 5400.0, 600.0),
        Window("today", "today", None, 600.0),
        Window("month_to_date", "month_to_date", None, 600.0),
        Window("billing_cycle", "billing_cycle", None, 600.0),
        Window("30d", "range", 30 * 86400.0, 1800.0),
        Window("1w", "range", 7 * 86400.0, 600.0),
    )


def test_calendar_window_entry_with_its_own_interval(tmp_path: Path) -> None:
    config = parse("windows: [{range: billing_cycle, interval: 1h}]\n" + MINIMAL, tmp_path)
    assert config.windows == (Window("billing_cycle", "billing_cycle", None, 3600.0),)


@pytest.mark.parametrize("value", ["1m", "60s", "60000ms"])
def test_one_minute_window_accepted(value: str, tmp_path: Path) -> None:
    assert parse(f"windows: ['{value}']\n" + MINIMAL, tmp_path).windows[0].range_seconds == 60.0


@pytest.mark.parametrize("value", ["59s", "30s", "500ms", "0s", "0"])
def test_window_below_one_minute_rejected(value: str, tmp_path: Path) -> None:
    reject(f"windows: [1h, '{value}']\n" + MINIMAL, tmp_path, "windows[1]", "minimum of 1m")


def test_window_entry_range_below_one_minute_rejected(tmp_path: Path) -> None:
    reject("windows: [{range: 30s, interval: 1m}]\n" + MINIMAL, tmp_path, "windows[0].range", "minimum of 1m")


def test_per_set_window_below_one_minute_rejected(tmp_path: Path) -> None:
    reject("org_sets:\n  - name: a\n    windows: [10s]\n", tmp_path, "org_sets[0].windows[0]", "minimum of 1m")


@pytest.mark.parametrize(
    ("windows", "path"),
    [("[1h, 24h, 1h]", "windows[2]"), ("[today, {range: today, interval: 1h}]", "windows[1]"),
     ("[{range: 7d}, 7d]", "windows[1]")],
)
def test_duplicate_window_rejected(windows: str, path: str, tmp_path: Path) -> None:
    reject(f"windows: {windows}\n" + MINIMAL, tmp_path, path, "listed twice")


def test_duplicate_window_in_set_rejected(tmp_path: Path) -> None:
    reject("org_sets:\n  - name: a\n    windows: [24h, 24h]\n", tmp_path, "org_sets[0].windows[1]", "listed twice")


def test_per_set_windows_override_the_global_list(tmp_path: Path) -> None:
    config = parse(
        """\
        windows: [1h, 7d]
        org_sets:
          - name: all
          - name: oncall
            windows: [today, {range: 24h, interval: 1m}]
        """,
        tmp_path,
    )
    all_set, oncall = config.org_sets
    assert [w.name for w in all_set.windows] == ["1h", "7d"]
    assert oncall.windows == (Window("today", "today", None, 300.0), Window("24h", "range", 86400.0, 60.0))


def test_per_set_windows_use_the_poll_interval(tmp_path: Path) -> None:
    config = parse("poll: {interval: 2m}\norg_sets: [{name: a, windows: [1h]}]\n", tmp_path)
    assert config.org_sets[0].windows[0].interval == 120.0


def test_window_entry_without_range_rejected(tmp_path: Path) -> None:
    reject("windows: [1h, {interval: 5m}]\n" + MINIMAL, tmp_path, "windows[1]", "needs `range`")


def test_window_entry_interval_below_one_second_rejected(tmp_path: Path) -> None:
    reject("windows: [{range: 1h, interval: 0s}]\n" + MINIMAL, tmp_path, "windows[0].interval", "at least 1s")


def test_window_entry_bad_interval_rejected(tmp_path: Path) -> None:
    reject("windows: [{range: 1h, interval: soon}]\n" + MINIMAL, tmp_path, "windows[0].interval")


@pytest.mark.parametrize("value", ["yesterday", "week_to_date", "Today", "24 h"])
def test_unknown_window_name_rejected(value: str, tmp_path: Path) -> None:
    reject(f"windows: ['{value}']\n" + MINIMAL, tmp_path, "windows[0]", "is not a window", "month_to_date")


@pytest.mark.parametrize(("value", "path", "problem"), [
    ("[[1h]]", "windows[0]", "is not a window"), ("[null]", "windows[0]", "is not a window"),
    ("[3600]", "windows[0]", "is not a window"), ("1h", "windows", "must be a list"),
    ("{range: 1h}", "windows", "must be a list"), ("null", "windows", "must be a list")])
def test_malformed_window_list_rejected(value: str, path: str, problem: str, tmp_path: Path) -> None:
    reject(f"windows: {value}\n" + MINIMAL, tmp_path, path, problem)


def test_empty_window_list_rejected(tmp_path: Path) -> None:
    reject("windows: []\n" + MINIMAL, tmp_path, "windows", "at least one window")
    reject("org_sets: [{name: a, windows: []}]\n", tmp_path, "org_sets[0].windows", "at least one window")


# --- window bounds ------------------------------------------------------------------------------


def test_range_bounds_end_now_minus_delay() -> None:
    window = Window("1h", "range", 3600.0, 300.0)
    assert window.bounds(utc(2026, 5, 10, 12, 0), 0, UTC) == (utc(2026, 5, 10, 11, 0), utc(2026, 5, 10, 12, 0))
    assert window.bounds(utc(2026, 5, 10, 12, 0), 300, LA) == (utc(2026, 5, 10, 10, 55), utc(2026, 5, 10, 11, 55))


def test_range_bounds_are_utc_whatever_the_zone_of_now() -> None:
    now = datetime(2026, 5, 10, 14, 0, tzinfo=ZoneInfo("Europe/Paris"))  # 12:00Z
    start, end = Window("24h", "range", 86400.0, 300.0).bounds(now, 0, LA)
    assert (start, end) == (utc(2026, 5, 9, 12), utc(2026, 5, 10, 12))
    assert end.utcoffset() == timedelta(0) and end.tzinfo == timezone.utc


def test_today_bounds_in_utc() -> None:
    start, end = Window("today", "today", None, 300.0).bounds(utc(2026, 5, 10, 12, 34, 56), 0, UTC)
    assert (start, end) == (utc(2026, 5, 10), utc(2026, 5, 10, 12, 34, 56))
    assert start.utcoffset() == timedelta(0)


def test_today_bounds_use_the_local_date() -> None:
    # 05:00Z on May 10 is still May 9, 22:00 PDT (UTC-7): today started at 07:00Z on May 9.
    start, end = Window("today", "today", None, 300.0).bounds(utc(2026, 5, 10, 5), 0, LA)
    assert (start, end) == (utc(2026, 5, 9, 7), utc(2026, 5, 10, 5))
    assert start.tzinfo == timezone.utc


def test_today_bounds_apply_the_delay_before_finding_midnight() -> None:
    start, end = Window("today", "today", None, 300.0).bounds(utc(2026, 5, 10, 0, 10), 900, UTC)
    assert (start, end) == (utc(2026, 5, 9), utc(2026, 5, 9, 23, 55))


def test_month_to_date_bounds_use_the_local_month() -> None:
    # 03:00Z on May 1 is April 30, 20:00 PDT: the month is April, which began at 07:00Z (PDT).
    window = Window("month_to_date", "month_to_date", None, 300.0)
    assert window.bounds(utc(2026, 5, 1, 3), 0, LA) == (utc(2026, 4, 1, 7), utc(2026, 5, 1, 3))
    assert window.bounds(utc(2026, 5, 1, 3), 0, UTC) == (utc(2026, 5, 1), utc(2026, 5, 1, 3))


def test_calendar_bounds_across_dst_end() -> None:
    # DST ends 2026-11-01 02:00 PDT. Now = 2026-11-02T12:00Z = Nov 2, 04:00 PST (UTC-8).
    now = utc(2026, 11, 2, 12)
    month_start, _ = Window("month_to_date", "month_to_date", None, 300.0).bounds(now, 0, LA)
    today_start, _ = Window("today", "today", None, 300.0).bounds(now, 0, LA)
    assert month_start == utc(2026, 11, 1, 7)  # Nov 1 00:00 was still PDT (UTC-7)
    assert today_start == utc(2026, 11, 2, 8)  # Nov 2 00:00 PST (UTC-8)


def test_calendar_bounds_across_dst_start() -> None:
    # DST starts 2026-03-08 02:00 PST. Now = 2026-03-10T12:00Z = Mar 10, 05:00 PDT (UTC-7).
    now = utc(2026, 3, 10, 12)
    month_start, _ = Window("month_to_date", "month_to_date", None, 300.0).bounds(now, 0, LA)
    today_start, _ = Window("today", "today", None, 300.0).bounds(now, 0, LA)
    assert month_start == utc(2026, 3, 1, 8)  # Mar 1 00:00 PST (UTC-8)
    assert today_start == utc(2026, 3, 10, 7)  # Mar 10 00:00 PDT (UTC-7)
    # On the day of the change itself, midnight was still PST.
    start, _ = Window("today", "today", None, 300.0).bounds(utc(2026, 3, 8, 12), 0, LA)
    assert start == utc(2026, 3, 8, 8)


def test_billing_cycle_bounds_are_left_to_the_api() -> None:
    window = Window("billing_cycle", "billing_cycle", None, 300.0)
    assert window.bounds(utc(2026, 5, 10, 12), 600, LA) == (None, None)


# --- unknown keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "hint"),
    [
        ("api:\n  api_kye: x\n" + MINIMAL, "api.api_kye", "did you mean 'api_key'?"),
        ("api:\n  max_concurency: 2\n" + MINIMAL, "api.max_concurency", "did you mean 'max_concurrency'?"),
        ("org_sets:\n  - name: a\n    org_id: [org-1]\n", "org_sets[0].org_id", "did you mean 'org_ids'?"),
        ("org_sets:\n  - name: a\n  - name: b\n    lables: {a: b}\n", "org_sets[1].lables", "did you mean 'labels'?"),
        ("pol:\n  interval: 5m\n" + MINIMAL, "pol", "did you mean 'poll'?"),
        ("poll:\n  intervall: 5m\n" + MINIMAL, "poll.intervall", "did you mean 'interval'?"),
        ("window: [1h]\n" + MINIMAL, "window", "did you mean 'windows'?"),
        ("windows: [{range: 1h, intervl: 5m}]\n" + MINIMAL, "windows[0].intervl", "did you mean 'interval'?"),
        ("server:\n  listn: ':9100'\n" + MINIMAL, "server.listn", "did you mean 'listen'?"),
        ("server:\n  web_config: x\n" + MINIMAL, "server.web_config", "did you mean 'web_config_file'?"),
        ("zzzzzz: 1\n" + MINIMAL, "zzzzzz", "valid keys: api, poll, windows, org_sets, server"),
    ],
)
def test_unknown_key_rejected_with_suggestion(text: str, path: str, hint: str, tmp_path: Path) -> None:
    reject(text, tmp_path, path, "unknown key", hint)


def test_non_string_key_rejected(tmp_path: Path) -> None:
    reject("api:\n  1: x\n" + MINIMAL, tmp_path, "api", "must be a string")


@pytest.mark.parametrize(("section", "value"), [("api", "[a]"), ("poll", "5m"), ("server", "true")])
def test_section_that_is_not_a_mapping_rejected(section: str, value: str, tmp_path: Path) -> None:
    reject(f"{section}: {value}\n" + MINIMAL, tmp_path, section, "must be a mapping")


# --- org sets -----------------------------------------------------------------------------------


def test_duplicate_org_set_names_rejected(tmp_path: Path) -> None:
    reject("org_sets:\n  - name: a\n  - name: b\n  - name: a\n", tmp_path, "org_sets[2].name",
           "duplicate org set name 'a'")


def test_org_set_names_compared_without_surrounding_spaces(tmp_path: Path) -> None:
    reject("org_sets:\n  - name: a\n  - name: ' a '\n", tmp_path, "org_sets[1].name", "duplicate")


@pytest.mark.parametrize("name", ["''", "'   '"])
def test_empty_org_set_name_rejected(name: str, tmp_path: Path) -> None:
    reject(f"org_sets:\n  - name: ok\n  - name: {name}\n", tmp_path, "org_sets[1].name", "must not be empty")


@pytest.mark.parametrize("name", ["null", "42", "[a]"])
def test_org_set_name_that_is_not_a_string_rejected(name: str, tmp_path: Path) -> None:
    reject(f"org_sets:\n  - name: {name}\n", tmp_path, "org_sets[0].name", "must be a string")


def test_org_set_without_name_rejected(tmp_path: Path) -> None:
    reject("org_sets:\n  - name: a\n  - org_ids: [x]\n", tmp_path, "org_sets[1]", "needs a `name`")
    reject("org_sets:\n  -\n", tmp_path, "org_sets[0]", "needs a `name`")


@pytest.mark.parametrize("text", ["org_sets: []\n", "org_sets:\n", "api: {}\n", "org_sets: null\n"])
def test_missing_or_empty_org_sets_rejected(text: str, tmp_path: Path) -> None:
    reject(text, tmp_path, "org_sets", "at least one org set")


@pytest.mark.parametrize("value", ["enterprise", "{name: a}", "3"])
def test_org_sets_that_is_not_a_list_rejected(value: str, tmp_path: Path) -> None:
    reject(f"org_sets: {value}\n", tmp_path, "org_sets", "must be a list")


def test_org_set_that_is_not_a_mapping_rejected(tmp_path: Path) -> None:
    reject("org_sets: [enterprise]\n", tmp_path, "org_sets[0]", "must be a mapping")


@pytest.mark.parametrize(
    ("value", "path", "problem"),
    [("org-1", "org_sets[0].org_ids", "must be a list"), ("[123]", "org_sets[0].org_ids[0]", "must be a string"),
     ("[a, '']", "org_sets[0].org_ids[1]", "must not be empty")],
)
def test_bad_org_ids_rejected(value: str, path: str, problem: str, tmp_path: Path) -> None:
    reject(f"org_sets: [{{name: a, org_ids: {value}}}]\n", tmp_path, path, problem)
    user_path = path.replace("org_ids", "user_ids")
    reject(f"org_sets: [{{name: a, user_ids: {value}}}]\n", tmp_path, user_path, problem)


def test_null_org_ids_mean_the_whole_enterprise(tmp_path: Path) -> None:
    config = parse("org_sets: [{name: a, org_ids: null, user_ids: []}]\n", tmp_path)
    assert config.org_sets[0].org_ids == () and config.org_sets[0].user_ids == ()


def test_yaml_merge_keys_work_inside_org_sets(tmp_path: Path) -> None:
    config = parse(
        """\
        org_sets:
          - &base {name: a, org_ids: [org-1], labels: {team: x}}
          - <<: *base
            name: b
        """,
        tmp_path,
    )
    assert [(s.name, s.org_ids, s.labels) for s in config.org_sets] == [
        ("a", ("org-1",), (("team", "x"),)), ("b", ("org-1",), (("team", "x"),))]


# --- API numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_max_concurrency_rejected(value: int, tmp_path: Path) -> None:
    reject(f"api: {{max_concurrency: {value}}}\n" + MINIMAL, tmp_path, "api.max_concurrency", "at least 1")


@pytest.mark.parametrize("value", ["1.5", "'4'", "true", "null"])
def test_non_integer_max_concurrency_rejected(value: str, tmp_path: Path) -> None:
    reject(f"api: {{max_concurrency: {value}}}\n" + MINIMAL, tmp_path, "api.max_concurrency", "must be an integer")


@pytest.mark.parametrize(("value", "problem"), [
    ("0", "greater than 0"), ("-2", "greater than 0"), ("0.0", "greater than 0"), ("'2'", "must be a number"),
    ("true", "must be a number"), (".nan", "finite"), (".inf", "finite")])
def test_bad_max_requests_per_second_rejected(value: str, problem: str, tmp_path: Path) -> None:
    reject(f"api: {{max_requests_per_second: {value}}}\n" + MINIMAL, tmp_path, "api.max_requests_per_second",
           problem)


def test_fractional_max_requests_per_second_accepted(tmp_path: Path) -> None:
    assert parse("api: {max_requests_per_second: 0.2}\n" + MINIMAL, tmp_path).api.max_requests_per_second == 0.2


@pytest.mark.parametrize(("value", "problem"), [("-1", "at least 0"), ("1.0", "integer"), ("'3'", "integer")])
def test_bad_retries_rejected(value: str, problem: str, tmp_path: Path) -> None:
    reject(f"api: {{retries: {value}}}\n" + MINIMAL, tmp_path, "api.retries", problem)


# --- labels -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["1team", "team-name", "__x", "team.name", "tèam"])
def test_invalid_label_name_rejected(name: str, tmp_path: Path) -> None:
    reject(f"org_sets: [{{name: a, labels: {{'{name}': v}}}}]\n", tmp_path, f"org_sets[0].labels.{name}",
           "not a valid Prometheus label name")


def test_non_string_label_name_rejected(tmp_path: Path) -> None:
    reject("org_sets: [{name: a, labels: {1: v}}]\n", tmp_path, "org_sets[0].labels.1",
           "not a valid Prometheus label name")


@pytest.mark.parametrize("name", ["org", "window"])
def test_reserved_label_name_rejected(name: str, tmp_path: Path) -> None:
    reject(f"org_sets:\n  - name: a\n  - name: b\n    labels: {{team: x, {name}: y}}\n", tmp_path,
           f"org_sets[1].labels.{name}", f"label '{name}' is set by the exporter")


@pytest.mark.parametrize("value", ["1", "true", "null", "[a]", "{a: b}", "1.5"])
def test_non_string_label_value_rejected(value: str, tmp_path: Path) -> None:
    reject(f"org_sets: [{{name: a, labels: {{team: {value}}}}}]\n", tmp_path, "org_sets[0].labels.team",
           "label values must be strings")


def test_labels_that_are_not_a_mapping_rejected(tmp_path: Path) -> None:
    reject("org_sets: [{name: a, labels: [team]}]\n", tmp_path, "org_sets[0].labels", "must be a mapping")


def test_valid_label_names_accepted(tmp_path: Path) -> None:
    config = parse("org_sets: [{name: a, labels: {_x: '1', Team2: b, org_name: c, windows: d}}]\n", tmp_path)
    assert config.org_sets[0].labels == (("Team2", "b"), ("_x", "1"), ("org_name", "c"), ("windows", "d"))


# --- poll and server ----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "problem"), [
    ("-0.1", "at least 0"), ("1", "less than 1"), ("1.5", "less than 1"), ("'0.1'", "must be a number"),
    (".nan", "finite")])
def test_jitter_out_of_range_rejected(value: str, problem: str, tmp_path: Path) -> None:
    reject(f"poll: {{jitter: {value}}}\n" + MINIMAL, tmp_path, "poll.jitter", problem)


@pytest.mark.parametrize("value", [0, 0.5, 0.99])
def test_jitter_in_range_accepted(value: float, tmp_path: Path) -> None:
    assert parse(f"poll: {{jitter: {value}}}\n" + MINIMAL, tmp_path).poll.jitter == value


@pytest.mark.parametrize(("value", "problem"), [("0", "at least 1"), ("-3", "at least 1"), ("1.5", "integer"),
                                                ("3m", "integer")])
def test_bad_stale_after_rejected(value: str, problem: str, tmp_path: Path) -> None:
    reject(f"poll: {{stale_after: {value}}}\n" + MINIMAL, tmp_path, "poll.stale_after", problem)


@pytest.mark.parametrize("value", ["Mars/Olympus", "America", "PST8PDT/x", "../etc/passwd", "/etc/localtime"])
def test_bad_timezone_rejected(value: str, tmp_path: Path) -> None:
    reject(f"poll: {{timezone: '{value}'}}\n" + MINIMAL, tmp_path, "poll.timezone", "not an IANA time zone")


def test_empty_timezone_rejected(tmp_path: Path) -> None:
    reject("poll: {timezone: ''}\n" + MINIMAL, tmp_path, "poll.timezone", "must not be empty")


def test_timezone_accepted(tmp_path: Path) -> None:
    config = parse("poll: {timezone: America/Los_Angeles}\n" + MINIMAL, tmp_path)
    assert config.poll.zone == LA


@pytest.mark.parametrize("value", ["'9877'", "9877", "'host:99999'", "'host:'", "'host:abc'", "':'", "'[::1]'",
                                   "'host:-1'", "'host:²'", "''"])
def test_bad_listen_rejected(value: str, tmp_path: Path) -> None:
    reject(f"server: {{listen: {value}}}\n" + MINIMAL, tmp_path, "server.listen")


@pytest.mark.parametrize(
    ("value", "host", "port", "listen"),
    [("'[::1]:9877'", "::1", 9877, "[::1]:9877"), ("'[::]:80'", "::", 80, "[::]:80"),
     ("':9100'", "0.0.0.0", 9100, "0.0.0.0:9100"), ("'localhost:0'", "localhost", 0, "localhost:0")],
)
def test_listen_forms_accepted(value: str, host: str, port: int, listen: str, tmp_path: Path) -> None:
    server = parse(f"server: {{listen: {value}}}\n" + MINIMAL, tmp_path).server
    assert (server.host, server.port, server.listen) == (host, port, listen)


@pytest.mark.parametrize("value", ["ftp://api.devin.ai", "api.devin.ai", "https://", "''", "42", "'http//x'"])
def test_base_url_that_is_not_http_rejected(value: str, tmp_path: Path) -> None:
    reject(f"api: {{base_url: {value}}}\n" + MINIMAL, tmp_path, "api.base_url")


def test_web_config_file_resolved_from_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "web.yml").write_text("basic_auth_users: {}\n")
    config = parse("server: {web_config_file: web.yml}\n" + MINIMAL, tmp_path)
    assert config.server.web_config_file == str(tmp_path / "web.yml")


def test_missing_web_config_file_rejected(tmp_path: Path) -> None:
    reject("server: {web_config_file: web.yml}\n" + MINIMAL, tmp_path, "server.web_config_file",
           "web.yml", "does not exist")


# --- the API version (SPEC §9) --------------------------------------------------------------------


@pytest.mark.parametrize(("key", "version"), [(COG, "v3"), ("apk_user_abc", "v2"), ("apk_legacy01", "v2")])
def test_auto_version_follows_the_key_prefix(key: str, version: str, tmp_path: Path) -> None:
    for text, env in ((MINIMAL, {"DEVIN_API_KEY": key}), (f"api: {{api_key: {key}}}\n" + MINIMAL, {})):
        api = parse(text, tmp_path, env).api
        assert (api.version, api.version_setting) == (version, "auto")
    (tmp_path / "key").write_text(key + "\n")
    api = parse("api: {api_key_file: key}\n" + MINIMAL, tmp_path, {}).api
    assert (api.version, api.version_setting) == (version, "auto")


def test_default_version_setting_is_auto(tmp_path: Path) -> None:
    assert parse("api: {version: auto}\n" + MINIMAL, tmp_path) == parse(MINIMAL, tmp_path)


@pytest.mark.parametrize("key", ["sk-LEAK0123456789", "APK_USER_LEAK0123", "Bearer cog_LEAK0123", "LEAKapk_user_0"])
def test_auto_version_rejects_a_key_of_another_shape(key: str, tmp_path: Path) -> None:
    expected = ("service user token (cog_...", "personal API key (apk_user_... or apk_...", "api.version")
    message = reject(MINIMAL, tmp_path, "api.api_key", *expected, "$DEVIN_API_KEY", env={"DEVIN_API_KEY": key})
    assert "LEAK" not in message
    message = reject(f"api: {{api_key: '{key}'}}\n" + MINIMAL, tmp_path, "api.api_key", *expected, env={})
    assert "LEAK" not in message
    (tmp_path / "key").write_text(key)
    message = reject("api: {api_key_file: key}\n" + MINIMAL, tmp_path, "api.api_key_file", *expected,
                     "the key in api.api_key_file", env={})
    assert "LEAK" not in message


@pytest.mark.parametrize(("version", "key", "kind"), [
    ("v3", "apk_user_LEAK0123", "a personal API key"), ("v3", "apk_LEAK01234", "a personal API key"),
    ("v2", "cog_LEAK0123456", "a service user token")])
def test_explicit_version_must_fit_the_key(version: str, key: str, kind: str, tmp_path: Path) -> None:
    text = f"api: {{version: {version}}}\n" + MINIMAL
    message = reject(text, tmp_path, "api.version", f"is {version}, but the API key in $DEVIN_API_KEY is {kind}",
                     env={"DEVIN_API_KEY": key})
    assert "LEAK" not in message
    (tmp_path / "key").write_text(key)
    message = reject(f"api: {{version: {version}, api_key_file: key}}\n" + MINIMAL, tmp_path, "api.version",
                     f"is {version}, but the key in api.api_key_file is {kind}", env={})
    assert "LEAK" not in message


@pytest.mark.parametrize(("version", "key"), [("v3", COG), ("v2", KEY), ("v2", "apk_legacy01")])
def test_explicit_version_that_fits_the_key(version: str, key: str, tmp_path: Path) -> None:
    api = parse(f"api: {{version: {version}}}\n" + MINIMAL, tmp_path, {"DEVIN_API_KEY": key}).api
    assert (api.version, api.version_setting) == (version, version)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_explicit_version_takes_a_key_of_another_shape(version: str, tmp_path: Path) -> None:
    # An escape hatch (a dedicated deployment's own token format): the API is the judge then.
    api = parse(f"api: {{version: {version}}}\n" + MINIMAL, tmp_path, {"DEVIN_API_KEY": "sk-custom-token"}).api
    assert api.version == version


@pytest.mark.parametrize(("value", "problem"), [
    ("v1", "'v1' is not an API version: use auto, v3 or v2"), ("V3", "is not an API version"),
    ("'auto '", "is not an API version"), ("3", "must be a string"), ("null", "must be a string"),
    ("''", "must not be empty")])
def test_bad_api_version_rejected(value: str, problem: str, tmp_path: Path) -> None:
    reject(f"api: {{version: {value}}}\n" + MINIMAL, tmp_path, "api.version", problem)


def test_key_shape_is_checked_after_the_rest_of_the_file(tmp_path: Path) -> None:
    # A key of an unknown shape is reported only once nothing else is wrong: the other mistake may be
    # the one to fix first, and it is named with its own key path.
    reject("api: {api_key: not-a-key}\n" + MINIMAL + "server: {listen: nowhere}\n", tmp_path, "server.listen")


@pytest.mark.parametrize("field", ["base_url", "api_key_file"])
def test_cog_token_in_the_wrong_field_is_masked(field: str, tmp_path: Path) -> None:
    # Not from the environment (that is masked as <${DEVIN_API_KEY}>): written into the file itself.
    message = reject(f"api: {{{field}: {COG}}}\n" + MINIMAL, tmp_path, f"api.{field}", env=ENV)
    assert "cog_***" in message


# --- collectors (SPEC §10) ----------------------------------------------------------------------


def test_collector_constants() -> None:
    assert COLLECTOR_NAMES == ("usage", "active_users", "consumption", "organizations", "queue")
    # The schema declares a section per collector, in the same order.
    assert config_schema.CollectorsSection.__struct_fields__ == COLLECTOR_NAMES
    assert tuple(config_module._COLLECTOR_SECTIONS) == COLLECTOR_NAMES
    for name, section in config_module._COLLECTOR_SECTIONS.items():
        assert f"$defs/{section.__name__}" in json.dumps(_root_collectors()[name])
    assert sorted(V3_ONLY_COLLECTORS) == ["active_users", "queue"]
    assert sorted(WINDOWED_COLLECTORS) == ["active_users", "consumption", "usage"]


def test_collectors_default_on_v3(tmp_path: Path) -> None:
    config = parse(MINIMAL, tmp_path, V3)
    assert list(config.collectors) == list(COLLECTOR_NAMES)
    assert config.collector("usage") == CollectorSettings("usage", True, 300.0)
    assert config.collector("active_users") == CollectorSettings("active_users", True, 300.0, None, 1, 1)
    consumption = config.collector("consumption")
    assert (consumption.enabled, consumption.interval) == (True, 1800.0)
    assert consumption.windows == (Window("today", "today", None, 1800.0), Window("7d", "range", 7 * 86400.0, 1800.0),
                                   Window("30d", "range", 30 * 86400.0, 1800.0),
                                   Window("billing_cycle", "billing_cycle", None, 1800.0))
    assert not any(w.interval_explicit for w in consumption.windows)
    assert config.collector("organizations") == CollectorSettings("organizations", True, 3600.0)
    assert config.collector("queue") == CollectorSettings("queue", True, 60.0)
    assert config.notes == ()


def test_v3_only_collectors_are_off_on_v2_with_a_note(tmp_path: Path) -> None:
    config = parse(MINIMAL, tmp_path)
    assert config.api.version == "v2"
    assert [n for n, c in config.collectors.items() if c.enabled] == ["usage", "consumption", "organizations"]
    assert config.notes == ("collector active_users is v3-only; off on API v2",
                            "collector queue is v3-only; off on API v2")


def test_v3_only_collector_written_without_enabled_is_off_on_v2(tmp_path: Path) -> None:
    config = parse("collectors: {active_users: {min_sessions: 2}, queue: {interval: 5m}}\n" + MINIMAL, tmp_path)
    assert config.collector("active_users") == CollectorSettings("active_users", False, 300.0, None, 2, 1)
    assert config.collector("queue") == CollectorSettings("queue", False, 300.0)
    assert len(config.notes) == 2


def test_v3_only_collector_disabled_on_v2_needs_no_note(tmp_path: Path) -> None:
    config = parse("collectors: {active_users: {enabled: false}, queue: {enabled: false}}\n" + MINIMAL, tmp_path)
    assert not config.collector("active_users").enabled and not config.collector("queue").enabled
    assert config.notes == ()


@pytest.mark.parametrize("name", ["active_users", "queue"])
def test_v3_only_collector_enabled_on_v2_rejected(name: str, tmp_path: Path) -> None:
    text = f"collectors:\n  {name}:\n    enabled: true\n" + MINIMAL
    reject(text, tmp_path, f"collectors.{name}.enabled", f"collector {name} needs API v3", "the API is v2")
    assert parse(text, tmp_path, V3).collector(name).enabled


def test_collectors_can_be_turned_off(tmp_path: Path) -> None:
    text = "collectors:\n" + "".join(f"  {name}: {{enabled: false}}\n" for name in COLLECTOR_NAMES) + MINIMAL
    config = parse(text, tmp_path, V3)
    assert not any(c.enabled for c in config.collectors.values())


def test_usage_and_active_users_follow_poll_interval(tmp_path: Path) -> None:
    config = parse("poll: {interval: 2m}\n" + MINIMAL, tmp_path, V3)
    assert {n: c.interval for n, c in config.collectors.items()} == {
        "usage": 120.0, "active_users": 120.0, "consumption": 1800.0, "organizations": 3600.0, "queue": 60.0}


def test_collector_settings_are_typed(tmp_path: Path) -> None:
    config = parse(
        """\
        collectors:
          usage: {interval: 10m}
          active_users: {interval: 1h, windows: [24h, 7d], min_sessions: 0, min_searches: 5}
          consumption: {interval: 1h}
          organizations: {interval: 6h}
          queue: {interval: 30s}
        org_sets: [{name: enterprise}]
        """,
        tmp_path,
        V3,
    )
    assert config.collector("usage") == CollectorSettings("usage", True, 600.0)
    active = config.collector("active_users")
    assert (active.interval, active.min_sessions, active.min_searches) == (3600.0, 0, 5)
    assert active.windows == (Window("24h", "range", 86400.0, 3600.0), Window("7d", "range", 7 * 86400.0, 3600.0))
    consumption = config.collector("consumption")
    assert [(w.name, w.interval) for w in consumption.windows or ()] == [
        ("today", 3600.0), ("7d", 3600.0), ("30d", 3600.0), ("billing_cycle", 3600.0)]
    assert config.collector("organizations").interval == 6 * 3600.0
    assert config.collector("queue").interval == 30.0


def test_window_interval_beats_collector_interval_beats_poll_interval(tmp_path: Path) -> None:
    config = parse(
        """\
        poll: {interval: 2m}
        windows: [1h, {range: 24h, interval: 15m}]
        collectors:
          usage: {interval: 10m}
        org_sets:
          - name: a
          - name: b
            windows: [7d, {range: 30d, interval: 1h}]
        """,
        tmp_path,
        V3,
    )
    a, b = config.org_sets
    usage, active = config.collector("usage"), config.collector("active_users")
    assert [(w.name, w.interval) for w in usage.windows_for(a)] == [("1h", 600.0), ("24h", 900.0)]
    assert [(w.name, w.interval) for w in usage.windows_for(b)] == [("7d", 600.0), ("30d", 3600.0)]
    assert [(w.name, w.interval) for w in active.windows_for(a)] == [("1h", 120.0), ("24h", 900.0)]
    assert [(w.name, w.interval_explicit) for w in a.windows] == [("1h", False), ("24h", True)]
    assert [w.interval for w in a.windows] == [120.0, 900.0]  # the org set's own view is unchanged


def test_collector_windows_replace_every_org_sets_windows(tmp_path: Path) -> None:
    config = parse(
        """\
        collectors:
          consumption: {interval: 1h, windows: [24h, {range: billing_cycle, interval: 6h}]}
        org_sets:
          - name: a
          - name: b
            windows: [7d]
        """,
        tmp_path,
    )
    consumption = config.collector("consumption")
    for org_set in config.org_sets:
        assert [(w.name, w.interval, w.interval_explicit) for w in consumption.windows_for(org_set)] == [
            ("24h", 3600.0, False), ("billing_cycle", 6 * 3600.0, True)]


@pytest.mark.parametrize("name", ["organizations", "queue"])
def test_enterprise_collectors_poll_no_windows(name: str, tmp_path: Path) -> None:
    config = parse(MINIMAL, tmp_path, V3)
    assert config.collector(name).windows_for(config.org_sets[0]) == ()


def test_empty_collector_sections_mean_defaults(tmp_path: Path) -> None:
    text = "collectors:\n" + "".join(f"  {name}:\n" for name in COLLECTOR_NAMES) + "discovery:\n" + MINIMAL
    assert parse(text, tmp_path, V3) == parse(MINIMAL, tmp_path, V3)
    assert parse("collectors:\n" + MINIMAL, tmp_path) == parse(MINIMAL, tmp_path)


def test_config_built_by_hand_gets_every_collector(tmp_path: Path) -> None:
    parsed = parse("poll: {interval: 1m}\n" + MINIMAL, tmp_path, V3)
    fields: dict[str, Any] = {"api": parsed.api, "poll": parsed.poll, "windows": parsed.windows,
                              "org_sets": parsed.org_sets, "server": parsed.server}
    built = Config(**fields)
    assert built.collectors == parsed.collectors == default_collectors(60.0, "v3")
    queue_off = CollectorSettings("queue", False, 60.0)
    assert Config(**fields, collectors={"queue": queue_off}).collector("queue") == queue_off
    with pytest.raises(ValueError, match=r"unknown collector\(s\): usgae"):
        Config(**fields, collectors={"usgae": queue_off})


def test_unknown_collector_name_raises_key_error(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="no collector 'usgae'"):
        parse(MINIMAL, tmp_path).collector("usgae")


@pytest.mark.parametrize(("text", "path", "problem"), [
    ("collectors: {usgae: {}}", "collectors.usgae", "unknown key; did you mean 'usage'?"),
    ("collectors: {zzz: {}}", "collectors.zzz", "valid keys: usage, active_users, consumption, organizations, queue"),
    ("collectors: {queue: {intervall: 1m}}", "collectors.queue.intervall", "unknown key; did you mean 'interval'?"),
    ("collectors: {organizations: {windows: [1h]}}", "collectors.organizations.windows", "unknown key"),
    ("collectors: {queue: {windows: [1h]}}", "collectors.queue.windows", "unknown key"),
    ("collectors: {usage: {min_sessions: 2}}", "collectors.usage.min_sessions", "unknown key"),
    ("collectors: {consumption: {min_searches: 2}}", "collectors.consumption.min_searches", "unknown key"),
    ("collectors: [usage]", "collectors", "must be a mapping"),
    ("collectors: {usage: true}", "collectors.usage", "must be a mapping"),
    ("collectors: {usage: {enabled: 'true'}}", "collectors.usage.enabled", "must be true or false, got a string"),
    ("collectors: {usage: {enabled: 1}}", "collectors.usage.enabled", "must be true or false, got an integer"),
    ("collectors: {usage: {enabled: null}}", "collectors.usage.enabled", "must be true or false, got nothing"),
    ("collectors: {queue: {interval: 5}}", "collectors.queue.interval", "is not a duration"),
    ("collectors: {queue: {interval: soon}}", "collectors.queue.interval", "is not a duration"),
    ("collectors: {queue: {interval: 500ms}}", "collectors.queue.interval", "must be at least 1s"),
    ("collectors: {organizations: {interval: 0s}}", "collectors.organizations.interval", "must be at least 1s"),
    ("collectors: {usage: {windows: []}}", "collectors.usage.windows", "at least one window"),
    ("collectors: {usage: {windows: 1h}}", "collectors.usage.windows", "must be a list"),
    ("collectors: {usage: {windows: null}}", "collectors.usage.windows", "must be a list"),
    ("collectors: {consumption: {windows: [7d, 7d]}}", "collectors.consumption.windows[1]", "listed twice"),
    ("collectors: {consumption: {windows: [30s]}}", "collectors.consumption.windows[0]", "minimum of 1m"),
    ("collectors: {active_users: {windows: [yesterday]}}", "collectors.active_users.windows[0]", "is not a window"),
    ("collectors: {usage: {windows: [{range: 1h, interval: 0s}]}}", "collectors.usage.windows[0].interval",
     "at least 1s"),
    ("collectors: {usage: {windows: [{interval: 5m}]}}", "collectors.usage.windows[0]", "needs `range`"),
    ("collectors: {active_users: {min_sessions: -1}}", "collectors.active_users.min_sessions", "at least 0, got -1"),
    ("collectors: {active_users: {min_searches: 1.5}}", "collectors.active_users.min_searches", "must be an integer"),
    ("collectors: {active_users: {min_searches: '2'}}", "collectors.active_users.min_searches", "must be an integer"),
    ("collectors: {active_users: {min_sessions: true}}", "collectors.active_users.min_sessions", "must be an integer"),
])
def test_bad_collectors_rejected(text: str, path: str, problem: str, tmp_path: Path) -> None:
    reject(text + "\n" + MINIMAL, tmp_path, path, problem, env=V3)


# --- organization discovery (SPEC §11) ----------------------------------------------------------


def test_discovery_is_off_by_default(tmp_path: Path) -> None:
    config = parse(MINIMAL, tmp_path)
    assert config.discovery == DiscoverySettings()
    assert config.discovery == DiscoverySettings(organizations=False, windows=None, labels=(), exclude=())
    assert "discovery" not in config.summary()


@pytest.mark.parametrize("org_sets", ["", "org_sets:\n", "org_sets: []\n"])
def test_discovery_makes_org_sets_optional(org_sets: str, tmp_path: Path) -> None:
    config = parse("discovery: {organizations: true}\n" + org_sets, tmp_path, V3)
    assert config.org_sets == () and config.discovery.organizations
    assert config.summary().startswith("test.yaml: OK: 0 org set(s), 0 schedule(s)")
    assert config.summary().endswith("; discovery of organizations on")


def test_without_discovery_org_sets_are_still_required(tmp_path: Path) -> None:
    reject("discovery: {organizations: false}\n", tmp_path, "org_sets", "at least one org set",
           "discovery.organizations")


def test_discovery_settings_are_typed(tmp_path: Path) -> None:
    config = parse(
        """\
        poll: {interval: 2m}
        discovery:
          organizations: true
          windows: [24h, {range: 7d, interval: 1h}]
          labels: {tier: gold, source: discovered}
          exclude: [org-sandbox, org-test]
        org_sets: [{name: enterprise}]
        """,
        tmp_path,
    )
    discovery = config.discovery
    assert discovery.windows == (Window("24h", "range", 86400.0, 120.0), Window("7d", "range", 7 * 86400.0, 3600.0))
    assert discovery.labels == (("source", "discovered"), ("tier", "gold"))
    assert discovery.exclude == ("org-sandbox", "org-test")
    assert [s.name for s in config.org_sets] == ["enterprise"]


def test_discovered_org_set_takes_discovery_labels_and_windows(tmp_path: Path) -> None:
    config = parse("discovery: {organizations: true, labels: {tier: gold}, windows: [7d]}\n", tmp_path, V3)
    org_set = config.discovered_org_set("Platform", "org-1")
    assert org_set == OrgSet("Platform", ("org-1",), (), (("org_id", "org-1"), ("tier", "gold")),
                             (Window("7d", "range", 7 * 86400.0, 300.0),))
    plain = parse("discovery: {organizations: true}\n", tmp_path, V3)
    assert plain.discovered_org_set("x", "org-2").windows == plain.windows


def test_discovery_needs_the_organizations_collector(tmp_path: Path) -> None:
    reject("collectors: {organizations: {enabled: false}}\ndiscovery: {organizations: true}\n", tmp_path,
           "discovery.organizations", "needs the organizations collector", "collectors.organizations.enabled")


@pytest.mark.parametrize(("text", "path", "problem"), [
    ("discovery: {organisations: true}", "discovery.organisations", "unknown key; did you mean 'organizations'?"),
    ("discovery: {lables: {}}", "discovery.lables", "did you mean 'labels'?"),
    ("discovery: [organizations]", "discovery", "must be a mapping"),
    ("discovery: {organizations: 'yes'}", "discovery.organizations", "must be true or false"),
    ("discovery: {windows: []}", "discovery.windows", "at least one window"),
    ("discovery: {windows: [1h, 1h]}", "discovery.windows[1]", "listed twice"),
    ("discovery: {windows: [10s]}", "discovery.windows[0]", "minimum of 1m"),
    ("discovery: {labels: {org_id: x}}", "discovery.labels.org_id", "label 'org_id' is set by the exporter"),
    ("discovery: {labels: {team-name: x}}", "discovery.labels.team-name", "not a valid Prometheus label name"),
    ("discovery: {labels: {team: 1}}", "discovery.labels.team", "label values must be strings"),
    ("discovery: {labels: [team]}", "discovery.labels", "must be a mapping"),
    ("discovery: {exclude: org-1}", "discovery.exclude", "must be a list"),
    ("discovery: {exclude: [org-1, 2]}", "discovery.exclude[1]", "must be a string"),
    ("discovery: {exclude: ['']}", "discovery.exclude[0]", "must not be empty"),
])
def test_bad_discovery_rejected(text: str, path: str, problem: str, tmp_path: Path) -> None:
    reject(text + "\n" + MINIMAL, tmp_path, path, problem)


# --- reserved label names (SPEC §10) ------------------------------------------------------------


def test_reserved_labels_are_every_label_the_exporter_sets() -> None:
    assert sorted(RESERVED_LABELS) == ["collector", "org", "org_id", "origin", "product", "size", "status", "window"]


@pytest.mark.parametrize("name", sorted(RESERVED_LABELS))
def test_every_reserved_label_rejected_on_org_sets_and_discovery(name: str, tmp_path: Path) -> None:
    reject(f"org_sets: [{{name: a, labels: {{team: x, {name}: y}}}}]\n", tmp_path, f"org_sets[0].labels.{name}",
           f"label '{name}' is set by the exporter")
    reject(f"discovery: {{organizations: true, labels: {{{name}: y}}}}\n", tmp_path, f"discovery.labels.{name}",
           f"label '{name}' is set by the exporter", env=V3)


# --- the reload endpoint switch (SPEC §13) ------------------------------------------------------


def test_enable_lifecycle_defaults_to_false(tmp_path: Path) -> None:
    assert parse(MINIMAL, tmp_path).server.enable_lifecycle is False
    assert parse("server: {enable_lifecycle: true}\n" + MINIMAL, tmp_path).server.enable_lifecycle is True


@pytest.mark.parametrize("value", ["'yes'", "1", "null", "[true]"])
def test_enable_lifecycle_that_is_not_a_boolean_rejected(value: str, tmp_path: Path) -> None:
    reject(f"server: {{enable_lifecycle: {value}}}\n" + MINIMAL, tmp_path, "server.enable_lifecycle",
           "must be true or false")


# --- the summary names the API version ----------------------------------------------------------


def test_summary_names_the_api_version(tmp_path: Path) -> None:
    assert ", API v2 https://api.devin.ai, listen " in parse(MINIMAL, tmp_path).summary()
    assert ", API v3 https://api.devin.ai, listen " in parse(MINIMAL, tmp_path, V3).summary()


# --- org sets added at run time -----------------------------------------------------------------


def sets(*names: str) -> tuple[OrgSet, ...]:
    return tuple(OrgSet(name, (f"id-{name}",)) for name in names)


def test_with_org_sets_appends_after_the_configured_ones(tmp_path: Path) -> None:
    config = parse("org_sets: [{name: a}, {name: b}]\n", tmp_path)
    grown = config.with_org_sets(sets("x", "y"))
    assert [s.name for s in grown.org_sets] == ["a", "b", "x", "y"]
    assert [s.name for s in config.org_sets] == ["a", "b"]  # the config itself is unchanged
    again = grown.with_org_sets(sets("z"))  # a later refresh replaces the earlier extra sets
    assert [s.name for s in again.org_sets] == ["a", "b", "z"]
    assert again.with_org_sets(()) == config
    assert (again.collectors, again.notes, again.api) == (config.collectors, config.notes, config.api)


def test_with_org_sets_rejects_a_taken_name(tmp_path: Path) -> None:
    config = parse("org_sets: [{name: a}]\n", tmp_path)
    with pytest.raises(ValueError, match="'a' is taken"):
        config.with_org_sets(sets("a"))
    with pytest.raises(ValueError, match="'x' is taken"):
        config.with_org_sets(sets("x", "x"))


def test_with_org_sets_keeps_only_the_shards_own_sets(tmp_path: Path) -> None:
    configured = [f"c{i}" for i in range(20)]
    extra = sets(*(f"d{i}" for i in range(20)))
    config = parse("org_sets:\n" + "".join(f"  - name: {n}\n" for n in configured), tmp_path)
    shard = Shard(1, 3)
    sharded = config.with_shard(shard).with_org_sets(extra)
    every = configured + [s.name for s in extra]
    assert [s.name for s in sharded.org_sets] == [n for n in every if shard.owns(n)]
    assert 0 < len(sharded.org_sets) < len(every)
    assert [s.name for s in sharded.all_org_sets] == every
    # The order of the two steps does not matter, and dropping the shard gives every set back.
    assert config.with_org_sets(extra).with_shard(shard) == sharded
    assert [s.name for s in sharded.with_shard(None).org_sets] == every
    assert sharded.with_org_sets(()).with_shard(None) == config


# --- config.example.yaml documents the collectors and discovery ---------------------------------


@pytest.mark.parametrize("env", [ENV, V3], ids=["v2", "v3"])
def test_example_collectors_and_discovery_are_the_defaults(env: dict[str, str]) -> None:
    config = load_config(EXAMPLE, env=env)
    default = parse_config(MINIMAL, env=env)
    assert config.collectors == default.collectors
    assert config.discovery == default.discovery
    assert config.notes == default.notes
    assert config.api.version_setting == "auto"


NEW_KEYS = sorted({
    *config_module._DISCOVERY_KEYS, *(key for keys in config_module._COLLECTOR_KEYS.values() for key in keys),
    *config_module._COLLECTOR_KEYS,
})


@pytest.mark.parametrize("key", NEW_KEYS)
def test_example_documents_every_collector_and_discovery_key(key: str) -> None:
    assert re.search(rf"(?<![\w]){key}\s*:", EXAMPLE.read_text()), f"{key} is not in {EXAMPLE.name}"


# --- YAML and the document as a whole -----------------------------------------------------------


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    reject("poll:\n  interval: 5m\norg_sets: [\n  {name: a}\n  {name: b}\n", tmp_path, "", "line 5", "invalid YAML")


def test_yaml_indentation_error_names_the_line(tmp_path: Path) -> None:
    reject("org_sets:\n  - name: a\n   bad: x\n", tmp_path, "", "line 3", "invalid YAML")


def test_tab_indentation_rejected_with_line(tmp_path: Path) -> None:
    reject("org_sets:\n\t- name: a\n", tmp_path, "", "line 2", "invalid YAML")


def test_duplicate_top_level_key_rejected(tmp_path: Path) -> None:
    reject("poll: {interval: 1m}\n" + MINIMAL + "poll: {interval: 2m}\n", tmp_path, "", "line 4",
           "duplicate key 'poll'")


def test_duplicate_nested_key_rejected(tmp_path: Path) -> None:
    reject("org_sets:\n  - name: a\n    org_ids: [x]\n    name: b\n", tmp_path, "", "line 4", "duplicate key 'name'")


@pytest.mark.parametrize("text", [
    "poll:\n  interval: 5m\norg_sets: [\n  {name: a}\n  {name: b}\n",  # a syntax error
    "org_sets:\n  - name: a\n   bad: x\n",  # indentation
    "org_sets:\n\t- name: a\n",  # a tab
    "poll: {interval: 1m}\npoll: {interval: 2m}\n",  # a duplicate key
    "a: &x {b: 1}\nc: *y\n",  # an unknown alias
    "a: [1, 2\n",  # unclosed
    "a: !!python/object:os.system {}\n",  # an unsafe tag
    "[" * 2000 + "]" * 2000 + "\n",  # nested too deeply
])
def test_libyaml_and_pure_loader_say_the_same(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast (libyaml) loader parses; every error is still worded, and placed, as PyYAML's own loader does."""
    from exporter import yamldoc

    def message() -> str:
        with pytest.raises(ConfigError) as caught:
            yamldoc.parse_yaml(text, "c.yaml")
        return str(caught.value)

    fast = message()
    monkeypatch.setattr(yamldoc, "_FastLoader", None)
    assert fast == message()


def test_libyaml_loader_reads_what_the_pure_loader_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    from exporter import yamldoc

    text = EXAMPLE.read_text() + "x: &a {b: [1, 2.5, '3', null, true, 2024-01-01]}\ny: {<<: *a, c: ~}\n"
    fast = yamldoc.parse_yaml(text, "c.yaml")
    monkeypatch.setattr(yamldoc, "_FastLoader", None)
    assert fast == yamldoc.parse_yaml(text, "c.yaml")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "null\n", "~\n"])
def test_empty_file_rejected(text: str, tmp_path: Path) -> None:
    reject(text, tmp_path, "", "empty")


@pytest.mark.parametrize(("text", "kind"), [("- name: a\n- name: b\n", "a list"), ("hello\n", "a string"),
                                             ("42\n", "an integer")])
def test_top_level_that_is_not_a_mapping_rejected(text: str, kind: str, tmp_path: Path) -> None:
    reject(text, tmp_path, "", f"must be a mapping (key: value), got {kind}")


def test_python_tags_rejected(tmp_path: Path) -> None:
    reject("org_sets: !!python/object/apply:os.system [echo hi]\n", tmp_path, "", "line 1", "invalid YAML")


@pytest.mark.parametrize(
    "text",
    [
        "org_sets:\n  - name: a\x01b\n",  # the YAML reader's own message spans two lines
        '"pol\\nl": 1\n' + MINIMAL,  # a key with a line break becomes part of the key path
        'org_sets: [{name: a, labels: {"a\\nb": x}}]\n',
        "? [a, b]\n: 1\n" + MINIMAL,  # unhashable key
        "[" * 1000 + "]" * 1000,  # absurd nesting
    ],
    ids=["control-character", "newline-in-key", "newline-in-label", "unhashable-key", "deep-nesting"],
)
def test_odd_documents_give_a_one_line_error(text: str, tmp_path: Path) -> None:
    reject(text, tmp_path, "")  # reject() asserts one line, the file name, and no key


# --- load_config --------------------------------------------------------------------------------


def test_load_config_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "exporter.yaml"
    file.write_text(MINIMAL)
    config = load_config(file, env=ENV)
    assert config.source == str(file)
    assert config.summary().startswith(f"{file}: OK: ")


def test_load_config_error_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "exporter.yaml"
    file.write_text("pol: {}\n" + MINIMAL)
    with pytest.raises(ConfigError) as info:
        load_config(file, env=ENV)
    assert str(info.value) == f"{file}: pol: unknown key; did you mean 'poll'?"


def test_missing_config_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml", env=ENV)
    assert str(info.value).startswith(f"{tmp_path / 'absent.yaml'}: cannot read config")


def test_config_file_that_is_a_directory_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, env=ENV)
    assert str(info.value).startswith(f"{tmp_path}: cannot read config")


def test_config_file_not_utf8_rejected(tmp_path: Path) -> None:
    file = tmp_path / "latin1.yaml"
    file.write_bytes("org_sets: [{name: caf\xe9}]\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(file, env=ENV)
    assert str(info.value) == f"{file}: not UTF-8 text"


def test_load_config_reads_the_process_environment_by_default(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVIN_API_KEY", "apk_user_from_process")
    file = tmp_path / "c.yaml"
    file.write_text(MINIMAL)
    assert load_config(file).api.api_key.reveal() == "apk_user_from_process"


@pytest.mark.parametrize("field", ["api_key_file", "base_url"])
def test_key_expanded_into_the_wrong_field_is_not_quoted_in_the_error(field: str, tmp_path: Path) -> None:
    key = "apk_user_WRONGFIELD_0123456789"
    with pytest.raises(ConfigError) as caught:
        parse_config(f'api: {{{field}: "${{DEVIN_API_KEY}}"}}\norg_sets: [{{name: a}}]\n', "test.yaml",
                     env={"DEVIN_API_KEY": key}, base_dir=tmp_path)
    message = str(caught.value)
    assert key not in message
    assert f"api.{field}" in message and "${DEVIN_API_KEY}" in message


@pytest.mark.parametrize(("doc", "path", "fragment"), [
    ("api: {base_url: 'http://[::1', api_key: k}", "api.base_url", "is not an http(s) URL"),
    ("api: {base_url: 'http://x:99999', api_key: k}", "api.base_url", "is not an http(s) URL"),
    ("api: {base_url: 'https://u:p@x', api_key: k}", "api.base_url", "must not contain credentials"),
    ("api: {api_key: k, timeout: 99999999999999999999y}", "api.timeout", "maximum of 100y"),
    ("api: {api_key: k}\nwindows: [200y]", "windows[0]", "maximum of 100y"),
])
def test_unusable_urls_and_absurd_durations_rejected(doc: str, path: str, fragment: str, tmp_path: Path) -> None:
    reject(doc + "\norg_sets: [{name: a}]\n", tmp_path, path, fragment)


def test_self_referencing_yaml_alias_is_a_clean_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^test\.yaml: invalid YAML: an alias refers to itself"):
        parse_config("a: &a [*a]\n", "test.yaml", env={}, base_dir=tmp_path)


# --- the declared schema and config.schema.json -------------------------------------------------

SCHEMA_FILE = EXAMPLE.parent / "config.schema.json"


def test_config_schema_json_is_generated_from_the_declaration() -> None:
    generated = json.dumps(config_schema.json_schema(), indent=2) + "\n"
    assert SCHEMA_FILE.read_text(encoding="utf-8") == generated, (
        "config.schema.json is stale: run  python -m exporter.config_schema > config.schema.json")


def test_config_schema_module_prints_the_committed_file() -> None:
    result = subprocess.run([sys.executable, "-m", "exporter.config_schema"], capture_output=True, text=True,
                            timeout=60, cwd=EXAMPLE.parent, check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout == SCHEMA_FILE.read_text(encoding="utf-8")


def test_example_points_editors_at_the_schema() -> None:
    assert EXAMPLE.read_text().splitlines()[0] == "# yaml-language-server: $schema=./config.schema.json"


def _objects(node: object) -> Iterator[dict[str, object]]:
    if isinstance(node, dict):
        if node.get("type") == "object":
            yield node
        for value in node.values():
            yield from _objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _objects(value)


def test_schema_forbids_unknown_keys_everywhere() -> None:
    schema = config_schema.json_schema()
    objects = list(_objects(schema))
    assert len(objects) >= 14  # the root, its sections, org set and window entries, five collectors
    for node in objects:
        if "properties" in node:  # a mapping of fixed keys; the others are labels (user-chosen names)
            assert node["additionalProperties"] is False, node
        else:
            assert node["additionalProperties"] == {"type": "string"}, node


def test_schema_states_the_schema_id_and_title() -> None:
    schema: Any = config_schema.json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "devin-usage-exporter config"
    assert list(schema["properties"]) == list(config_module._TOP_KEYS)


def _defs(name: str) -> Any:
    schema: Any = config_schema.json_schema()
    return schema["$defs"][name]


DURATION_SAMPLES = ["30s", "5m", "1h30m", "7d", "2w", "1y", "500ms", "0", "0s", "1m500ms", "5 minutes", "", "5",
                    "1h 30m", "5M", "-5m", "1.5h", "30m1h", "m", "5min", " 5m", "today"]


@pytest.mark.parametrize("text", DURATION_SAMPLES)
def test_schema_duration_pattern_is_the_parsers(text: str) -> None:
    prop = _defs("PollSection")["properties"]["delay"]
    accepted_by_schema = len(text) >= prop["minLength"] and re.search(prop["pattern"], text) is not None
    try:
        config_module.parse_duration(text)
        accepted = True
    except ValueError:
        accepted = False
    assert accepted_by_schema == accepted


# The schema's pattern says nothing of the 1m minimum: no samples below it.
WINDOW_SAMPLES = [t for t in DURATION_SAMPLES if t not in ("30s", "500ms", "0", "0s")] + [
    "month_to_date", "billing_cycle", "Today", "yesterday", "today "]


@pytest.mark.parametrize("text", WINDOW_SAMPLES)
def test_schema_window_pattern_is_the_parsers(text: str, tmp_path: Path) -> None:
    prop = _defs("WindowEntry")["properties"]["range"]
    accepted_by_schema = len(text) >= prop["minLength"] and re.search(prop["pattern"], text) is not None
    try:
        parse(f"windows: [{json.dumps(text)}]\n" + MINIMAL, tmp_path)
        accepted = True
    except ConfigError:
        accepted = False
    assert accepted_by_schema == accepted


@pytest.mark.parametrize("name", ["team", "_x", "Team2", "org_name", "1team", "team-name", "__x", "tèam",
                                  *sorted(RESERVED_LABELS)])
def test_schema_label_names_are_the_parsers(name: str, tmp_path: Path) -> None:
    rule = _defs("OrgSetEntry")["properties"]["labels"]["anyOf"][0]["propertyNames"]
    forbidden = rule["not"]["anyOf"]
    accepted_by_schema = (re.search(rule["pattern"], name) is not None
                          and not re.search(forbidden[0]["pattern"], name) and name not in forbidden[1]["enum"])
    try:
        parse(f"org_sets: [{{name: a, labels: {{'{name}': v}}}}]\n", tmp_path)
        accepted = True
    except ConfigError:
        accepted = False
    assert accepted_by_schema == accepted


def _root_collectors() -> Any:
    return _defs("CollectorsSection")["properties"]


def _root_property(name: str) -> Any:
    schema: Any = config_schema.json_schema()
    return schema["properties"][name]


def test_schema_defaults_are_the_parsers(tmp_path: Path) -> None:
    """Writing every default the schema states changes nothing: they are the defaults the parser applies."""
    def defaults(name: str) -> dict[str, object]:
        return {key: prop["default"] for key, prop in _defs(name)["properties"].items()
                if "default" in prop and prop["default"] is not None}

    document = {
        "api": defaults("ApiSection"), "poll": defaults("PollSection"), "server": defaults("ServerSection"),
        "windows": _root_property("windows")["default"],
        "collectors": {name: defaults(section.__name__)
                       for name, section in config_module._COLLECTOR_SECTIONS.items()},
        "discovery": defaults("DiscoverySection"),
        "org_sets": [{"name": "enterprise"}],
    }
    assert document["api"] == {"base_url": "https://api.devin.ai", "version": "auto", "timeout": "30s",
                               "max_concurrency": 4, "max_requests_per_second": 2.0, "retries": 3}
    for env in (ENV, V3):
        assert parse(json.dumps(document), tmp_path, env) == parse(MINIMAL, tmp_path, env)


def test_settings_defaults_are_the_config_files(tmp_path: Path) -> None:
    # The frozen settings have defaults of their own, for code that builds them directly: the same ones.
    config = parse(MINIMAL, tmp_path)
    assert config.api == ApiSettings(base_url=DEFAULT_BASE_URL, api_key=config.api.api_key)
    assert config.poll == PollSettings()
    assert config.server == ServerSettings()
    assert config.discovery == DiscoverySettings()
    assert config.collectors == default_collectors()
    v3 = parse(MINIMAL, tmp_path, V3)
    assert v3.collectors == default_collectors(version="v3")


def test_a_complaint_the_translation_does_not_know_is_still_one_line_at_its_key_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unknown(message: str, root: object) -> NoReturn:
        raise StopIteration

    monkeypatch.setattr(config_schema, "_explain", unknown)
    reject("api: {retries: many}\n" + MINIMAL, tmp_path, "api.retries", "Expected `int`, got `str`")
    reject("- a\n", tmp_path, "", "Expected `object`, got `array`")
