"""Integration tests of the running daemon: Exporter + HTTP app against the simulator over real sockets.

The simulator and the exporter share one fake wall clock, and every config polls each schedule
exactly once at start-up (`jitter: 0`, long interval), so every published value is known exactly
from `expected_usage`. Further polls are forced through the poller, never waited for.
"""

from __future__ import annotations

import asyncio
import gzip
import platform
import shutil
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from subprocess import PIPE

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient, TestServer
from helpers import (
    KEY,
    T0,
    USAGE_METRICS,
    WallClock,
    family_types,
    labels,
    make_config,
    parse_samples,
    query_key,
    usage_schedules,
    wait_until,
)
from prometheus_client import generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from exporter import USER_AGENT, __version__
from exporter.catalogue.declare import format_rfc3339
from exporter.cli import _reloader
from exporter.config import Config, ConfigError, OrgSet, Window, parse_config
from exporter.plan import plan_of
from exporter.poller import Poller
from exporter.server import create_app
from exporter.service import Exporter
from exporter.simulator import (
    REQUESTS_KEY,
    Faults,
    RecordedRequest,
    expected_usage,
    start_simulator,
)

# The SPEC's example shape: whole enterprise, a filtered set with static labels, and a set with
# users and its own windows, including both calendar kinds. Pacific time makes `today` non-trivial.
THREE_SETS = """
- name: enterprise
- name: platform
  org_ids: [org-123, org-456]
  labels: {team: platform, tier: gold}
- name: mobile-oncall
  org_ids: [org-789]
  user_ids: [user-1, user-2]
  windows: [24h, today, billing_cycle, {range: 30d, interval: 30m}]
"""


@dataclass
class Rig:
    """One simulator and one exporter app served on 127.0.0.1, sharing a fake wall clock."""

    clock: WallClock
    faults: Faults
    sim: web.AppRunner
    exporter: Exporter
    client: TestClient[web.Request, web.Application]

    @property
    def config(self) -> Config:
        return self.exporter.config

    @property
    def poller(self) -> Poller:
        assert self.exporter._poller is not None
        return self.exporter._poller

    def org_set(self, name: str) -> OrgSet:
        return next(s for s in self.config.org_sets if s.name == name)

    def requests(self) -> list[RecordedRequest]:
        return list(self.sim.app[REQUESTS_KEY])  # type: ignore[index]  # AppKey of a generic deque

    async def scrape(self, headers: dict[str, str] | None = None) -> str:
        response = await self.client.get("/metrics", headers=headers)
        assert response.status == 200
        return await response.text()

    async def samples(self) -> dict[str, dict[frozenset[tuple[str, str]], float]]:
        return parse_samples(await self.scrape())

    def all_polled(self) -> bool:
        snap = self.exporter.snapshot
        return all(snap.result(s.name, "usage", w.name).last_attempt is not None for s, w in usage_schedules(snap))

    async def wait_first_polls(self) -> None:
        """/readyz 200, then every (org set, window) has finished its first poll."""

        async def ready() -> bool:
            return (await self.client.get("/readyz")).status == 200

        deadline_ok = False
        for _ in range(250):
            if await ready():
                deadline_ok = True
                break
            await _tick()
        assert deadline_ok, "/readyz never became 200"
        await wait_until(self.all_polled, what="every schedule's first poll")

    async def repoll(self, set_name: str, window_name: str | None = None) -> list[bool]:
        """Force a poll of one set's windows (or one window) now, as its schedule would."""
        org_set = self.org_set(set_name)
        return [
            await self.poller.poll(self.poller.key("usage", org_set, w))
            for w in org_set.windows
            if window_name in (None, w.name)
        ]


async def _tick() -> None:
    await asyncio.sleep(0.02)


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig() -> AsyncIterator[RigFactory]:
    """Start simulator + exporter for a config built by `make_config(base_url, org_sets, **kw)`."""
    started: list[Rig] = []

    async def make(
        org_sets: str = THREE_SETS,
        *,
        faults: Faults | None = None,
        clock: WallClock | None = None,
        wait: bool = True,
        **config_kw: object,
    ) -> Rig:
        clock = clock or WallClock()
        faults = faults or Faults()
        sim, base_url = await start_simulator(api_key=KEY, faults=faults, clock=clock.datetime)
        config = make_config(base_url, org_sets, **config_kw)  # type: ignore[arg-type]
        # random=0: no first-poll spread and no backoff wait between retries.
        exporter = Exporter(config, clock=clock.time, random=lambda: 0.0)
        # These tests assert what a scrape shows right after a poll; the up to 1 s lag a regularly
        # scraped /metrics may show while it is re-rendered is tested in test_exposition.py.
        exporter.exposition.max_lag = 0.0
        client = TestClient(TestServer(create_app(exporter), host="127.0.0.1"))
        rig = Rig(clock, faults, sim, exporter, client)
        started.append(rig)
        await client.start_server()
        if wait:
            await rig.wait_first_polls()
        return rig

    yield make
    for rig in reversed(started):
        await rig.client.close()  # stops the exporter (cleanup_ctx) before its upstream goes away
        await rig.sim.cleanup()


def expected_query(org_set: OrgSet, window: Window, config: Config, now: datetime) -> dict[str, list[str]]:
    start, end = window.bounds(now, config.poll.delay, config.poll.zone)
    query: dict[str, list[str]] = {}
    if start is not None and end is not None:
        query["start_date"] = [format_rfc3339(start)]
        query["end_date"] = [format_rfc3339(end)]
    if org_set.org_ids:
        query["org_ids"] = list(org_set.org_ids)
    if org_set.user_ids:
        query["user_ids"] = list(org_set.user_ids)
    return query


def expected_values(org_set: OrgSet, window: Window, config: Config, now: datetime) -> dict[str, int]:
    start, end = window.bounds(now, config.poll.delay, config.poll.zone)
    return expected_usage(org_set.org_ids, org_set.user_ids, start, end, now=now)


def usage_series(
    samples: dict[str, dict[frozenset[tuple[str, str]], float]],
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every devin_usage_* sample except the health timestamp, keyed by (name, labels)."""
    return {
        (name, lbls): value
        for name, series in samples.items()
        if name.startswith("devin_usage_") and name != "devin_usage_last_success_timestamp_seconds"
        for lbls, value in series.items()
    }


def series_of(
    samples: dict[str, dict[frozenset[tuple[str, str]], float]], org: str, window: str | None = None
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample (of any family) labelled with this org (and window)."""
    return {
        (name, lbls): v
        for name, series in samples.items()
        for lbls, v in series.items()
        if ("org", org) in lbls and (window is None or ("window", window) in lbls)
    }


def expected_series(
    config: Config, now: datetime, *, only: str | None = None
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for org_set in config.org_sets:
        if only is not None and org_set.name != only:
            continue
        for window in org_set.windows:
            lbls = labels(org=org_set.name, window=window.name, **dict(org_set.labels))
            for api_field, value in expected_values(org_set, window, config, now).items():
                out[(USAGE_METRICS[api_field], lbls)] = float(value)
    return out


# --------------------------------------------------------------------------------------------
# 1. exact values


async def test_every_org_set_and_window_publishes_exactly_what_the_api_returned(make_rig: RigFactory) -> None:
    rig = await make_rig(THREE_SETS, windows="[1h, 24h, 7d]", delay="5m", zone="America/Los_Angeles")
    config = rig.config
    samples = await rig.samples()

    expected = expected_series(config, T0)
    assert len(expected) == 5 * (3 + 3 + 4)
    assert usage_series(samples) == expected
    # Spot-check the expectation itself is not degenerate: counts differ by org set and window.
    assert len({v for (name, _), v in expected.items() if name == "devin_usage_sessions"}) > 5
    assert all(v > 0 for (name, _), v in expected.items() if name == "devin_usage_sessions")

    # The simulator saw exactly one request per schedule, with exactly the window's parameters.
    recorded = rig.requests()
    assert {r.path for r in recorded} == {"/v2/enterprise/metrics/usage"}
    assert {r.user_agent for r in recorded} == {USER_AGENT}
    assert Counter(query_key(r.query) for r in recorded) == Counter(
        query_key(expected_query(s, w, config, T0)) for s, w in usage_schedules(rig.exporter.snapshot)
    )

    # Independent of Window.bounds: what those windows mean at 2026-11-24T18:00Z with a 5m delay.
    by_window = {
        (tuple(r.query.get("org_ids", [])), r.query.get("start_date", [None])[0]): r.query for r in recorded
    }
    oncall = ("org-789",)
    assert by_window[oncall, "2026-11-23T17:55:00Z"]["end_date"] == ["2026-11-24T17:55:00Z"]  # 24h
    # today in Los Angeles (PST, UTC-8) began at 08:00Z; the window ends at now - delay.
    assert by_window[oncall, "2026-11-24T08:00:00Z"]["end_date"] == ["2026-11-24T17:55:00Z"]
    assert by_window[oncall, "2026-10-25T17:55:00Z"]["user_ids"] == ["user-1", "user-2"]  # 30d
    billing = [r.query for r in recorded if "start_date" not in r.query]
    assert billing == [{"org_ids": ["org-789"], "user_ids": ["user-1", "user-2"]}]
    enterprise = [r.query for r in recorded if "org_ids" not in r.query]
    assert len(enterprise) == 3 and all("user_ids" not in q for q in enterprise)
    assert [q["org_ids"] for q in (r.query for r in recorded) if q.get("org_ids", [""])[0] == "org-123"] == [
        ["org-123", "org-456"]
    ] * 3

    # Health series for every schedule, stamped with the fake wall clock.
    assert samples["devin_up"] == {labels(org=s.name): 1.0 for s in config.org_sets}
    assert samples["devin_usage_last_success_timestamp_seconds"] == {
        labels(org=s.name, window=w.name): T0.timestamp() for s, w in usage_schedules(rig.exporter.snapshot)
    }


# --------------------------------------------------------------------------------------------
# 2. devin_up


async def test_devin_up_is_zero_for_every_org_set_from_start_up_until_a_first_success(
    make_rig: RigFactory,
) -> None:
    config = make_config("http://127.0.0.1:9", THREE_SETS)
    before = parse_samples(generate_latest(Exporter(config).registry).decode())
    assert before["devin_up"] == {labels(org=s.name): 0.0 for s in config.org_sets}

    # Live: the upstream hangs, so no poll has finished; devin_up is there and 0, no usage yet.
    rig = await make_rig(THREE_SETS, faults=Faults(hang=True), wait=False, timeout="60s")
    await wait_until(lambda: len(rig.requests()) == 8, what="all first polls in flight")
    samples = await rig.samples()
    assert samples["devin_up"] == {labels(org=s.name): 0.0 for s in rig.config.org_sets}
    assert usage_series(samples) == {}
    assert "devin_usage_last_success_timestamp_seconds" not in samples


async def test_devin_up_follows_the_latest_poll_of_every_window_of_the_set(make_rig: RigFactory) -> None:
    rig = await make_rig(THREE_SETS, retries=0)
    names = [s.name for s in rig.config.org_sets]
    assert (await rig.samples())["devin_up"] == {labels(org=n): 1.0 for n in names}
    requests_before = len(rig.requests())

    rig.faults.status = 500
    assert await rig.repoll("platform", "24h") == [False]  # one window failing is enough
    assert len(rig.requests()) == requests_before + 1  # retries: 0 means one attempt
    up = (await rig.samples())["devin_up"]
    assert up == {
        labels(org="enterprise"): 1.0,
        labels(org="platform"): 0.0,
        labels(org="mobile-oncall"): 1.0,
    }

    assert await rig.repoll("enterprise") == [False, False]
    assert (await rig.samples())["devin_up"][labels(org="enterprise")] == 0.0

    rig.faults.status = None
    assert await rig.repoll("platform") == [True, True]
    assert await rig.repoll("enterprise") == [True, True]
    assert (await rig.samples())["devin_up"] == {labels(org=n): 1.0 for n in names}


# --------------------------------------------------------------------------------------------
# 3. staleness


async def test_usage_series_disappear_after_stale_after_intervals_without_success_but_health_stays(
    make_rig: RigFactory,
) -> None:
    org_sets = """
    - name: enterprise
    - name: platform
      org_ids: [org-123]
      windows: [1h, {range: 24h, interval: 2h}]
    """
    rig = await make_rig(org_sets, windows="[1h]", interval="1h", stale_after=2)
    published = await rig.samples()
    assert usage_series(published) == expected_series(rig.config, T0)

    rig.faults.status = 503
    rig.clock.advance(60)
    assert await rig.repoll("platform") == [False, False]
    assert await rig.repoll("enterprise") == [False]

    # 2 intervals of 1h since the last success, minus a second: the last good values stay.
    rig.clock.now = T0.replace(hour=19, minute=59, second=59)
    assert usage_series(await rig.samples()) == expected_series(rig.config, T0)

    # Just over 2h: the 1h windows are stale; the 24h window (interval 2h, so 4h) is not yet.
    rig.clock.now = T0.replace(hour=20, minute=0, second=1)
    samples = await rig.samples()
    assert usage_series(samples) == {
        k: v for k, v in expected_series(rig.config, T0).items() if ("window", "24h") in k[1]
    }
    assert samples["devin_up"] == {labels(org="enterprise"): 0.0, labels(org="platform"): 0.0}
    assert samples["devin_usage_last_success_timestamp_seconds"] == {
        labels(org="enterprise", window="1h"): T0.timestamp(),
        labels(org="platform", window="1h"): T0.timestamp(),
        labels(org="platform", window="24h"): T0.timestamp(),
    }

    # Just over 4h: the 24h window's values go too; the health series still stay.
    rig.clock.now = T0.replace(hour=22, minute=0, second=1)
    samples = await rig.samples()
    assert usage_series(samples) == {}
    assert len(samples["devin_usage_last_success_timestamp_seconds"]) == 3
    assert set(samples["devin_up"].values()) == {0.0}

    # A success brings the values back, for the new time.
    rig.faults.status = None
    assert await rig.repoll("platform", "24h") == [True]
    now = rig.clock.now
    assert usage_series(await rig.samples()) == {
        k: v
        for k, v in expected_series(rig.config, now, only="platform").items()
        if ("window", "24h") in k[1]
    }


# --------------------------------------------------------------------------------------------
# 4. reload

TWO_SETS = """
- name: enterprise
- name: platform
  org_ids: [org-123, org-456]
  labels: {team: platform}
"""


def _count_for(rig: Rig, org_ids: list[str] | None) -> int:
    return sum(1 for r in rig.requests() if r.query.get("org_ids") == org_ids)


async def test_reload_adding_an_org_set_polls_it_and_leaves_running_schedules_untouched(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig(TWO_SETS)
    base_url = rig.config.api.base_url
    schedules_before = dict(rig.poller._schedules)
    requests_before = {
        "enterprise": _count_for(rig, None),
        "platform": _count_for(rig, ["org-123", "org-456"]),
    }
    assert requests_before == {"enterprise": 2, "platform": 2}

    # Time moves on, so a (wrong) re-poll of an existing set would change its values.
    rig.clock.advance(600)
    new = make_config(
        base_url,
        TWO_SETS
        + """
- name: newcomer
  org_ids: [org-d4e5f6]
  windows: [7d]
""",
    )
    assert await rig.exporter.reload(lambda: new) is True
    await wait_until(rig.all_polled, what="the new org set's first poll")

    samples = await rig.samples()
    assert usage_series(samples) == {
        **expected_series(rig.config, T0, only="enterprise"),
        **expected_series(rig.config, T0, only="platform"),
        **expected_series(rig.config, rig.clock.now, only="newcomer"),
    }
    assert samples["devin_up"][labels(org="newcomer")] == 1.0
    # The existing schedules are the very same ones, still timed, and asked nothing new.
    for key, schedule in schedules_before.items():
        assert rig.poller._schedules[key] is schedule
        assert not schedule.removed
    assert {
        "enterprise": _count_for(rig, None),
        "platform": _count_for(rig, ["org-123", "org-456"]),
    } == requests_before
    assert _count_for(rig, ["org-d4e5f6"]) == 1
    assert len(rig.poller._schedules) == 5


async def test_reload_removing_an_org_set_removes_every_series_it_had(make_rig: RigFactory) -> None:
    rig = await make_rig(TWO_SETS)
    rig.faults.status = 500
    await rig.repoll("platform")  # so it has error counters too
    rig.faults.status = None
    before = await rig.samples()
    assert {name for name, _ in series_of(before, "platform")} >= {
        "devin_up",
        "devin_usage_sessions",
        "devin_usage_last_success_timestamp_seconds",
        "devin_exporter_api_requests_total",
        "devin_exporter_api_errors_total",
        "devin_exporter_api_request_duration_seconds_count",
        "devin_exporter_api_request_duration_seconds_bucket",
    }
    platform = [s for k, s in rig.poller._schedules.items() if k.org_set == "platform"]

    new = make_config(rig.config.api.base_url, "- name: enterprise")
    assert await rig.exporter.reload(lambda: new) is True
    after = await rig.samples()
    assert series_of(after, "platform") == {}
    assert "platform" not in (await (await rig.client.get("/")).text())
    # The survivor is untouched, and the removed set's schedules are gone for good.
    assert series_of(after, "enterprise") == series_of(before, "enterprise")
    assert all(s.removed and s.poll is None for s in platform)
    assert {k.org_set for k in rig.poller._schedules} == {"enterprise"}
    assert {s.key.org_set for _, _, s in rig.poller._timers.heap if not s.removed} == {"enterprise"}
    assert (await rig.client.get("/readyz")).status == 200
    assert (await rig.client.get("/healthz")).status == 200


async def test_reload_changing_an_org_sets_filter_republishes_it_with_the_new_filter(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig(TWO_SETS)
    old = {k: s for k, s in rig.poller._schedules.items() if k.org_set == "platform"}
    rig.clock.advance(120)
    changed = TWO_SETS.replace("[org-123, org-456]", "[org-789]")
    new = make_config(rig.config.api.base_url, changed)
    assert await rig.exporter.reload(lambda: new) is True
    await wait_until(
        lambda: _count_for(rig, ["org-789"]) == 2 and rig.all_polled(), what="re-poll of platform"
    )

    samples = await rig.samples()
    assert usage_series(samples) == {
        **expected_series(rig.config, T0, only="enterprise"),
        **expected_series(rig.config, rig.clock.now, only="platform"),
    }
    assert expected_series(rig.config, rig.clock.now, only="platform") != expected_series(
        make_config(rig.config.api.base_url, TWO_SETS), rig.clock.now, only="platform"
    )
    assert all(s.removed for s in old.values())
    assert not set(old) & set(rig.poller._schedules)


async def test_invalid_reload_keeps_the_running_config_and_reports_it_until_a_good_reload(
    make_rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    rig = await make_rig(TWO_SETS)
    base_url = rig.config.api.base_url
    running = rig.config
    before = await rig.samples()
    assert before["devin_exporter_config_last_reload_successful"] == {labels(): 1.0}
    assert before["devin_exporter_config_last_reload_success_timestamp_seconds"] == {labels(): T0.timestamp()}

    def broken() -> Config:
        return parse_config(
            f"api: {{base_url: {base_url}, api_key: {KEY}}}\npoll: {{intervall: 1m}}\n"
            "org_sets: [{name: x}]\n",
            "test.yaml",
            env={},
        )

    rig.clock.advance(30)
    with pytest.raises(ConfigError):
        broken()
    assert await rig.exporter.reload(broken) is False
    assert rig.config is running
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "poll.intervall" in errors[0].getMessage()
    assert KEY not in caplog.text
    after = await rig.samples()
    assert after["devin_exporter_config_last_reload_successful"] == {labels(): 0.0}
    assert after["devin_exporter_config_last_reload_success_timestamp_seconds"] == {labels(): T0.timestamp()}
    assert usage_series(after) == usage_series(before)
    assert after["devin_up"] == before["devin_up"]
    assert (await rig.client.get("/healthz")).status == 200

    rig.clock.advance(30)
    assert await rig.exporter.reload(lambda: make_config(base_url, TWO_SETS)) is True
    good = await rig.samples()
    assert good["devin_exporter_config_last_reload_successful"] == {labels(): 1.0}
    assert good["devin_exporter_config_last_reload_success_timestamp_seconds"] == {
        labels(): T0.timestamp() + 60
    }
    # An identical config keeps every schedule, so nothing was re-polled.
    assert usage_series(good) == usage_series(before)


async def test_reload_whose_loader_crashes_is_reported_as_failed_and_keeps_the_running_config(
    make_rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Not every loader failure is a ConfigError (a validation gap can let ValueError through);
    # the SIGHUP path must still keep the old config and say the reload failed.
    rig = await make_rig(TWO_SETS)
    running = rig.config

    def crashing() -> Config:
        raise ValueError("Invalid IPv6 URL")

    assert await rig.exporter.reload(crashing) is False
    assert rig.config is running
    samples = await rig.samples()
    assert samples["devin_exporter_config_last_reload_successful"] == {labels(): 0.0}
    assert usage_series(samples) == expected_series(running, T0)
    assert any(r.levelname == "ERROR" and "Invalid IPv6 URL" in r.getMessage() for r in caplog.records)


async def test_sighup_reads_the_config_off_the_event_loop_and_a_second_sighup_reloads_once_more(
    make_rig: RigFactory,
) -> None:
    # Parsing 1,000 org sets of YAML takes ~0.4 s: the SIGHUP handler must not stall polls and
    # scrapes meanwhile, and a SIGHUP during a reload must not be lost (the file may have changed
    # again after it was read) nor start a second reload alongside.
    rig = await make_rig(TWO_SETS)
    base_url = rig.config.api.base_url
    configs = [make_config(base_url, TWO_SETS + "\n- name: third\n  org_ids: [org-3]\n"),
               make_config(base_url, TWO_SETS + "\n- name: fourth\n  org_ids: [org-4]\n")]
    loads: list[Config] = []
    release = threading.Event()

    def slow_load() -> Config:
        assert release.wait(10), "the test never released the load"
        loads.append(configs[len(loads)])
        return loads[-1]

    on_sighup = _reloader(rig.exporter, slow_load)
    on_sighup()
    on_sighup()  # during the first reload: one more after it
    on_sighup()  # ... not two more
    for _ in range(3):  # while the load blocks its thread, the loop serves scrapes
        assert (await rig.client.get("/metrics")).status == 200
    assert [s.name for s in rig.exporter.config.org_sets] == ["enterprise", "platform"]
    release.set()
    await wait_until(lambda: not [t for t in asyncio.all_tasks() if t.get_name() == "config reload"],
                     what="the reloads to finish")
    assert loads == configs  # exactly two reloads, in order
    assert [s.name for s in rig.exporter.config.org_sets][-1] == "fourth"


# --------------------------------------------------------------------------------------------
# 5. probes


async def test_readyz_waits_for_a_first_poll_attempt_of_every_org_set_and_healthz_is_ok_meanwhile(
    make_rig: RigFactory,
) -> None:
    # The upstream never answers; the 1s timeout is what ends each first attempt.
    rig = await make_rig(TWO_SETS, faults=Faults(hang=True), wait=False, timeout="1s")
    await wait_until(lambda: len(rig.requests()) == 4, what="first polls in flight")
    response = await rig.client.get("/readyz")
    assert response.status == 503
    text = await response.text()
    assert "enterprise" in text and "platform" in text
    assert (await rig.client.get("/healthz")).status == 200

    await rig.wait_first_polls()  # ready after a failed attempt too: it is about attempts
    assert (await rig.client.get("/readyz")).status == 200
    assert (await rig.client.get("/healthz")).status == 200
    samples = await rig.samples()
    assert samples["devin_up"] == {labels(org="enterprise"): 0.0, labels(org="platform"): 0.0}
    assert {k: v for k, v in samples["devin_exporter_api_errors_total"].items() if v} == {
        labels(collector="usage", org="enterprise", reason="timeout"): 2.0,
        labels(collector="usage", org="platform", reason="timeout"): 2.0,
    }


async def test_healthz_fails_once_the_poll_loop_has_stopped(make_rig: RigFactory) -> None:
    rig = await make_rig(TWO_SETS)
    assert (await rig.client.get("/healthz")).status == 200
    await rig.poller.stop()
    response = await rig.client.get("/healthz")
    assert response.status == 503


# --------------------------------------------------------------------------------------------
# 6. promtool


async def test_promtool_check_metrics_accepts_the_live_exposition(make_rig: RigFactory) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`); cannot lint the exposition")
    rig = await make_rig(THREE_SETS, windows="[1h, 24h, 7d]")
    rig.faults.status = 500
    await rig.repoll("platform", "1h")  # error counters and a devin_up 0 in the exposition too
    text = await rig.scrape()
    assert "devin_exporter_api_errors_total" in text
    process = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics", stdin=PIPE, stdout=PIPE, stderr=PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(text.encode()), 20)
    assert (process.returncode, stdout.decode(), stderr.decode()) == (0, "", "")


# --------------------------------------------------------------------------------------------
# 7. content negotiation


async def test_metrics_negotiates_openmetrics_gzip_and_text_format(make_rig: RigFactory) -> None:
    rig = await make_rig(TWO_SETS)
    url = rig.client.make_url("/metrics")
    # A session that sends no Accept-Encoding of its own and does not decompress behind our back.
    async with ClientSession(auto_decompress=False, skip_auto_headers=("Accept-Encoding", "Accept")) as http:
        async with http.get(url) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            assert "Content-Encoding" not in response.headers
            plain = await response.text()
        assert "# EOF" not in plain
        assert usage_series(parse_samples(plain)) == expected_series(rig.config, T0)

        async with http.get(
            url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        ) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
            openmetrics = await response.text()
        assert openmetrics.endswith("# EOF\n")
        families = {f.name: f for f in parse_openmetrics(openmetrics)}  # type: ignore[no-untyped-call]
        assert families["devin_exporter_api_requests"].type == "counter"
        assert families["devin_exporter_api_request_duration_seconds"].type == "histogram"
        om_sessions = {frozenset(s.labels.items()): s.value for s in families["devin_usage_sessions"].samples}
        assert om_sessions == {
            lbls: v
            for (name, lbls), v in expected_series(rig.config, T0).items()
            if name == "devin_usage_sessions"
        }

        async with http.get(url, headers={"Accept-Encoding": "gzip"}) as response:
            assert response.status == 200
            assert response.headers["Content-Encoding"] == "gzip"
            assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            body = await response.read()
        unzipped = gzip.decompress(body).decode()
        assert usage_series(parse_samples(unzipped)) == expected_series(rig.config, T0)
        assert unzipped.startswith("# HELP")


# --------------------------------------------------------------------------------------------
# 8. API counters and build info


async def test_api_counters_and_latency_histogram_count_every_attempt(make_rig: RigFactory) -> None:
    rig = await make_rig(TWO_SETS, retries=2)  # random=0 makes every backoff 0s
    samples = await rig.samples()
    assert samples["devin_exporter_api_requests_total"] == {
        labels(collector="usage", org="enterprise", code="200"): 2.0,
        labels(collector="usage", org="platform", code="200"): 2.0,
    }
    # Every reason is published at 0 from the start, so rate() sees the very first error.
    reasons = {"rate_limited", "server_error", "auth", "client_error", "timeout", "connection",
               "invalid_response"}
    assert samples["devin_exporter_api_errors_total"] == {
        labels(collector="usage", org=org, reason=reason): 0.0
        for org in ("enterprise", "platform") for reason in reasons}

    rig.faults.status = 500
    assert await rig.repoll("platform") == [False, False]  # 2 windows x (1 + 2 retries)
    rig.faults.update({"status": 429, "retry_after": None})
    assert await rig.repoll("platform", "1h") == [False]  # 3 attempts
    rig.faults.status = 401
    assert await rig.repoll("enterprise", "24h") == [False]  # not retried
    rig.faults.status = None

    samples = await rig.samples()
    assert samples["devin_exporter_api_requests_total"] == {
        labels(collector="usage", org="enterprise", code="200"): 2.0,
        labels(collector="usage", org="enterprise", code="401"): 1.0,
        labels(collector="usage", org="platform", code="200"): 2.0,
        labels(collector="usage", org="platform", code="500"): 6.0,
        labels(collector="usage", org="platform", code="429"): 3.0,
    }
    assert {k: v for k, v in samples["devin_exporter_api_errors_total"].items() if v} == {
        labels(collector="usage", org="enterprise", reason="auth"): 1.0,
        labels(collector="usage", org="platform", reason="server_error"): 6.0,
        labels(collector="usage", org="platform", reason="rate_limited"): 3.0,
    }
    # One histogram observation per attempt, matching what the simulator actually received.
    by_org = Counter("platform" if r.query.get("org_ids") else "enterprise" for r in rig.requests())
    assert by_org == {"enterprise": 3, "platform": 11}
    count = samples["devin_exporter_api_request_duration_seconds_count"]
    assert count == {labels(collector="usage", org=o): float(n) for o, n in by_org.items()}
    buckets = samples["devin_exporter_api_request_duration_seconds_bucket"]
    for org, n in by_org.items():
        assert buckets[labels(collector="usage", org=org, le="+Inf")] == float(n)
        ours = sorted((float(dict(lbls)["le"]), v) for lbls, v in buckets.items() if ("org", org) in lbls)
        assert [v for _, v in ours] == sorted(v for _, v in ours)  # cumulative
    assert all(v >= 0 for v in samples["devin_exporter_api_request_duration_seconds_sum"].values())

    text = await rig.scrape()
    types = family_types(text)
    assert types["devin_exporter_api_requests"] == "counter"
    assert types["devin_exporter_api_errors"] == "counter"
    assert types["devin_exporter_api_request_duration_seconds"] == "histogram"
    assert samples["devin_exporter_build_info"] == {
        labels(version=__version__, python_version=platform.python_version()): 1.0
    }
    for family in ("process_cpu_seconds_total", "python_info"):
        assert family in samples, f"{family} (standard collectors) missing"
    for line in text.splitlines():  # no timestamps on samples: exactly one token after the series
        if line and not line.startswith("#"):
            rest = line.rsplit("}", 1)[1] if "{" in line else line.split(" ", 1)[1]
            assert len(rest.split()) == 1, f"sample with a timestamp: {line!r}"


# --------------------------------------------------------------------------------------------
# 9. landing page and key hygiene


async def test_landing_page_lists_every_org_set_and_window_and_never_the_key(make_rig: RigFactory) -> None:
    org_sets = (
        THREE_SETS
        + """
- name: r&d <lab>
  org_ids: [org-a1b2c3]
"""
    )
    rig = await make_rig(org_sets)
    response = await rig.client.get("/")
    assert response.status == 200
    assert response.content_type == "text/html"
    page = await response.text()
    for org_set in rig.config.org_sets:
        if org_set.name != "r&d <lab>":
            assert f"<td>{org_set.name}</td>" in page
        for window in org_set.windows:
            assert f"<td>{window.name}</td>" in page
    assert "<td>r&amp;d &lt;lab&gt;</td>" in page  # escaped, not injected
    assert "<lab>" not in page
    for link in ("metrics", "healthz", "readyz"):
        assert f'href="{link}"' in page
    assert KEY not in page
    assert "DAEMONLEAK" not in page
    metrics = await rig.scrape()
    assert "DAEMONLEAK" not in metrics
    assert "DAEMONLEAK" not in await (await rig.client.get("/readyz")).text()


# --------------------------------------------------------------------------------------------
# 10. extra numeric fields


async def test_extra_numeric_api_field_is_exported_as_its_own_gauge() -> None:
    async def usage(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "sessions_count": 7,
                "searches_count": 9,
                "prs_opened": 3,
                "prs_closed": 2,
                "prs_merged": 1,
                "acu_used": 12,
                "note": "not a number",
                "flag": True,
            }
        )

    upstream = web.Application()
    upstream.router.add_get("/v2/enterprise/metrics/usage", usage)
    api = TestServer(upstream, host="127.0.0.1")
    await api.start_server()
    clock = WallClock()
    config = make_config(f"http://127.0.0.1:{api.port}", TWO_SETS)
    exporter = Exporter(config, clock=clock.time, random=lambda: 0.0)
    client = TestClient(TestServer(create_app(exporter), host="127.0.0.1"))
    await client.start_server()
    try:
        rig = Rig(clock, Faults(), None, exporter, client)  # type: ignore[arg-type]
        await rig.wait_first_polls()
        text = await rig.scrape()
        samples = parse_samples(text)
        assert samples["devin_usage_acu_used"] == {
            labels(org="enterprise", window="1h"): 12.0,
            labels(org="enterprise", window="24h"): 12.0,
            labels(org="platform", window="1h", team="platform"): 12.0,
            labels(org="platform", window="24h", team="platform"): 12.0,
        }
        assert family_types(text)["devin_usage_acu_used"] == "gauge"
        assert samples["devin_usage_sessions"][labels(org="enterprise", window="1h")] == 7.0
        assert samples["devin_usage_prs_merged"][labels(org="platform", window="24h", team="platform")] == 1.0
        assert not any(name.startswith(("devin_usage_note", "devin_usage_flag")) for name in samples)
        assert set(samples["devin_up"].values()) == {1.0}
    finally:
        await client.close()
        await api.close()


async def test_metrics_name_filter_returns_only_the_requested_series(make_rig: RigFactory) -> None:
    # prometheus_client's handler supports `?name[]=`; the app's collectors must take part in it.
    rig = await make_rig(TWO_SETS)
    response = await rig.client.get(
        "/metrics", params=[("name[]", "devin_up"), ("name[]", "devin_usage_sessions")]
    )
    assert response.status == 200
    samples = parse_samples(await response.text())
    assert set(samples) == {"devin_up", "devin_usage_sessions"}
    assert samples["devin_usage_sessions"] == {
        lbls: v
        for (name, lbls), v in expected_series(rig.config, T0).items()
        if name == "devin_usage_sessions"
    }


async def test_readyz_stays_ready_while_an_org_set_added_by_reload_waits_for_its_first_poll(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig(TWO_SETS)
    rig.faults.hang = True  # the newcomer's first poll cannot finish
    new = make_config(rig.config.api.base_url, TWO_SETS + "\n- name: newcomer\n  windows: [7d]\n")
    assert await rig.exporter.reload(lambda: new) is True
    await wait_until(lambda: any(r.query.get("org_ids") is None and r.status is None for r in rig.requests()),
                     what="the newcomer's poll in flight")
    assert not plan_of(rig.exporter.config).ready(rig.exporter.snapshot)
    # A routine reload must not pull the pod out of its Service.
    assert (await rig.client.get("/readyz")).status == 200


async def test_changing_the_time_zone_repolls_only_calendar_windows(make_rig: RigFactory) -> None:
    sets = "- name: oncall\n  windows: [24h, today]\n"
    rig = await make_rig(sets)
    schedules_before = dict(rig.poller._schedules)
    new = make_config(rig.config.api.base_url, sets, zone="America/Los_Angeles")
    assert await rig.exporter.reload(lambda: new) is True
    kept = {key.window.name for key, schedule in schedules_before.items()
            if rig.poller._schedules.get(key) is schedule}
    assert kept == {"24h"}


async def test_reload_changing_only_the_interval_keeps_values_and_devin_up(make_rig: RigFactory) -> None:
    rig = await make_rig(TWO_SETS)
    before = await rig.samples()
    assert set(before["devin_up"].values()) == {1.0}
    rig.faults.hang = True  # a re-poll could not succeed: what stays published is what was kept
    new = make_config(rig.config.api.base_url, TWO_SETS, interval="2h")
    assert await rig.exporter.reload(lambda: new) is True
    after = await rig.samples()
    assert after["devin_up"] == before["devin_up"]
    assert usage_series(after) == usage_series(before)
    assert {w.interval for s in rig.config.org_sets for w in s.windows} == {7200.0}


async def test_reload_before_the_poller_exists_is_not_lost() -> None:
    config = make_config("http://127.0.0.1:9", "- name: first\n")
    newer = make_config("http://127.0.0.1:9", "- name: second\n")
    exporter = Exporter(config)
    assert await exporter.reload(lambda: newer) is True
    assert [s.name for s in exporter.config.org_sets] == ["second"]
