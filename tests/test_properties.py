"""Generated bad input: config documents and API reply bodies (hypothesis, derandomized for CI).

Config: whatever YAML a user writes, the loader returns a Config or raises a ConfigError that is
one line starting with the file name; never another exception. API bodies (served over a real
loopback socket): a poll either publishes exactly the body's five counts, or fails as
`invalid_response` and publishes nothing from that reply; never a traceback, never a partial
snapshot, and the exposition always renders.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
import yaml
from aiohttp import web
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import RESERVED_LABELS, Config, ConfigError, parse_config
from exporter.plan import ScheduleKey
from exporter.poller import Poller
from exporter.service import Exporter
from exporter.simulator import USAGE_PATH

SOURCE: Final = "prop.yaml"
FIELDS: Final = ("sessions_count", "searches_count", "prs_opened", "prs_closed", "prs_merged")
METRICS: Final = dict(
    zip(
        FIELDS,
        (
            "devin_usage_sessions",
            "devin_usage_searches",
            "devin_usage_prs_opened",
            "devin_usage_prs_closed",
            "devin_usage_prs_merged",
        ),
        strict=True,
    )
)
PROFILE: Final = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
# Text a user might type where a duration, name or label goes: near-misses more than noise.
fragments = st.sampled_from(
    [
        "5m",
        "1h30m",
        "24h",
        "7d",
        "30s",
        "59s",
        "60s",
        "1m",
        "team",
        "team_1",
        "Tier",
        "0s",
        "500ms",
        "",
        " ",
        "0",
        "1",
        "30",
        "s",
        "m",
        "h",
        "d",
        "w",
        "y",
        "ms",
        "-",
        ".",
        "_",
        "a",
        "Z",
        "__",
        "${X}",
        "${DEVIN_API_KEY}",
        "${Y:-5m}",
        ":",
        "\n",
        "\t",
        "é",
        "org",
        "window",
        "[",
        "{",
        "'",
        '"',
        "#",
        "*",
        "&",
        "!",
        "%",
    ]
)
near_text = fragments | st.lists(fragments, max_size=6).map("".join) | st.text(max_size=15)


def skeleton() -> dict[str, Any]:
    return {
        "api": {
            "base_url": "https://api.devin.ai",
            "api_key": "apk_user_prop",
            "timeout": "30s",
            "max_concurrency": 4,
            "max_requests_per_second": 2,
            "retries": 3,
        },
        "poll": {"interval": "5m", "jitter": 0.1, "delay": "0s", "stale_after": 3, "timezone": "UTC"},
        "windows": ["1h", "24h", {"range": "30d", "interval": "30m"}],
        "org_sets": [
            {"name": "a", "org_ids": ["o1"], "labels": {"team": "x"}, "windows": ["7d", "today"]},
            {"name": "b"},
        ],
        "server": {"listen": "127.0.0.1:9877"},
    }


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


PATHS: Final = [p for p in _paths(skeleton()) if p]


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """The valid skeleton with a few places replaced, removed or added to."""
    doc = skeleton()
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        parent: Any = doc
        try:
            for step in path[:-1]:
                parent = parent[step]
            last = path[-1]
            parent[last]
        except (KeyError, IndexError, TypeError):
            continue
        action = draw(st.sampled_from(["value", "text", "remove", "add"]))
        if action == "value":
            parent[last] = draw(json_values)
        elif action == "text":
            parent[last] = draw(near_text)
        elif action == "remove":
            del parent[last]
        elif isinstance(parent[last], dict):
            parent[last][draw(near_text)] = draw(json_values)
        elif isinstance(parent[last], list):
            parent[last].append(draw(json_values | near_text))
    return doc


def check_config(text: str, tmp: Path, env: dict[str, str] | None = None) -> Config | None:
    try:
        return parse_config(text, SOURCE, env=env or {"DEVIN_API_KEY": "apk_user_env"}, base_dir=tmp)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{SOURCE}: "), message
        assert "\n" not in message and "\r" not in message, message
        return None


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("props")


def _dump(doc: object) -> str:
    try:
        return yaml.safe_dump(doc, allow_unicode=True)
    except yaml.YAMLError:
        assume(False)
        raise


@PROFILE
@given(doc=documents())
def test_any_config_document_loads_or_is_a_one_line_error_naming_the_file(
    doc: dict[str, Any], tmp: Path
) -> None:
    check_config(_dump(doc), tmp)


@PROFILE
@given(
    text=st.text(max_size=200)
    | st.lists(
        fragments | st.sampled_from(["api:", "org_sets:", "- name: a", "windows:", "poll:", "  "]),
        max_size=12,
    ).map("\n".join)
)
def test_any_text_loads_or_is_a_one_line_error_naming_the_file(text: str, tmp: Path) -> None:
    check_config(text, tmp)


@PROFILE
@given(
    where=st.sampled_from(["interval", "window", "set window", "label", "timeout", "delay"]), value=near_text
)
def test_durations_windows_and_label_names_are_accepted_only_when_valid(
    where: str, value: str, tmp: Path
) -> None:
    doc = skeleton()
    if where == "interval":
        doc["poll"]["interval"] = value
    elif where == "window":
        doc["windows"] = [value]
    elif where == "set window":
        doc["org_sets"][0]["windows"] = [{"range": "7d", "interval": value}]
    elif where == "label":
        doc["org_sets"][0]["labels"] = {value: "v"}
    elif where == "timeout":
        doc["api"]["timeout"] = value
    else:
        doc["poll"]["delay"] = value
    config = check_config(_dump(doc), tmp, env={})
    if config is None:
        return
    windows = [*config.windows, *(w for s in config.org_sets for w in s.windows)]
    assert config.poll.interval >= 1 and all(w.interval >= 1 for w in windows)
    assert all(w.kind != "range" or (w.range_seconds or 0) >= 60 for w in windows)
    assert config.api.timeout > 0 and config.poll.delay >= 0
    ((name, _),) = config.org_sets[0].labels
    assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", name) and not name.startswith("__"), name
    assert name not in RESERVED_LABELS


# --------------------------------------------------------------------------------------------
# API bodies


@dataclass
class BodyRig:
    """One loopback server answering with `body`, and a poller for one org set and window."""

    loop: asyncio.AbstractEventLoop
    runner: web.AppRunner
    exporter: Exporter
    poller: Poller
    key: ScheduleKey
    body: bytes = b""

    def poll(self, body: bytes) -> bool:
        self.body = body
        return self.loop.run_until_complete(asyncio.wait_for(self.poller.poll(self.key), 10))


@pytest.fixture(scope="module")
def body_rig() -> Iterator[BodyRig]:
    loop = asyncio.new_event_loop()
    holder: list[BodyRig] = []

    async def usage(request: web.Request) -> web.Response:
        return web.Response(body=holder[0].body, content_type="application/json")

    async def start() -> BodyRig:
        app = web.Application()
        app.router.add_get(USAGE_PATH, usage)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        config = parse_config(
            f"api: {{base_url: 'http://127.0.0.1:{port}', api_key: apk_user_prop, retries: 0, timeout: 5s,"
            " max_requests_per_second: 10000}\npoll: {interval: 1h, jitter: 0}\nwindows: [1h]\n"
            "org_sets: [{name: p}]\n",
            SOURCE,
            env={},
        )
        exporter = Exporter(config, clock=lambda: 1_795_000_000.0, random=lambda: 0.0)
        poller = await exporter.open()
        org_set = config.org_sets[0]
        return BodyRig(
            loop, runner, exporter, poller, poller.key("usage", org_set, org_set.windows[0])
        )

    rig = loop.run_until_complete(start())
    holder.append(rig)
    yield rig
    loop.run_until_complete(rig.exporter.close())
    loop.run_until_complete(rig.runner.cleanup())
    loop.close()


def expected_counts(body: bytes) -> dict[str, int] | None:
    """The contract (SPEC §4): a JSON object with the five fields, each an integer from 0 to 2**53."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    counts = {f: document.get(f) for f in FIELDS}
    if not all(type(v) is int and 0 <= v <= 2**53 for v in counts.values()):
        return None
    return counts  # type: ignore[return-value]


counts = st.integers(0, 2**53) | st.integers(0, 1000)
valid_objects = st.fixed_dictionaries({f: counts for f in FIELDS}).flatmap(
    lambda d: st.dictionaries(st.text(max_size=10), json_values, max_size=3).map(lambda extra: {**extra, **d})
)


@st.composite
def broken_objects(draw: st.DrawFn) -> dict[str, Any]:
    document = draw(valid_objects)
    victim = draw(st.sampled_from(FIELDS))
    if draw(st.booleans()):
        del document[victim]
    else:
        document[victim] = draw(
            json_values
            | st.integers(-(2**70), -1)
            | st.integers(2**53 + 1, 2**70)
            | st.sampled_from([True, False, 1.0, 0.5, "12", None, [], {}, math.inf])
        )
    return document


bodies = (
    valid_objects.map(lambda d: json.dumps(d).encode())
    | broken_objects().map(lambda d: json.dumps(d).encode())
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=200)
    | st.sampled_from(
        [
            b"",
            b"null",
            b"{}",
            b"[]",
            b'{"sessions_count": NaN}',
            b"\xef\xbb\xbf{}",
            b"1e999",
            b'{"a": ' * 5000,
        ]
    )
)
GOOD: Final = {"sessions_count": 5, "searches_count": 4, "prs_opened": 3, "prs_closed": 2, "prs_merged": 1}


@PROFILE
@given(body=bodies)
def test_a_reply_is_published_whole_or_rejected_as_invalid_response_and_nothing_changes(
    body: bytes, body_rig: BodyRig
) -> None:
    assert body_rig.poll(json.dumps(GOOD).encode()) is True  # a known last good state
    before = body_rig.exporter.snapshot.result("p", "usage", "1h")

    ok = body_rig.poll(body)
    result = body_rig.exporter.snapshot.result("p", "usage", "1h")
    expected = expected_counts(body)
    exposition = generate_latest(body_rig.exporter.registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(exposition)}
    published = {
        field: next(
            (s.value for s in families[metric].samples if s.labels == {"org": "p", "window": "1h"}), None
        )
        for field, metric in METRICS.items()
        if metric in families
    }
    if expected is not None:
        assert ok and result.ok and result.error is None
        values = {p.family: p.value for p in result.points or ()}
        assert {f: values[METRICS[f]] for f in FIELDS} == expected
        assert published == {f: float(v) for f, v in expected.items()}
    else:
        assert not ok and not result.ok
        assert result.error == "invalid_response"  # an ApiError of that reason, not an internal error
        assert result.points == before.points and result.last_success == before.last_success
        assert published == {f: float(v) for f, v in GOOD.items()}
