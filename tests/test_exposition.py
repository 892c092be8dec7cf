"""The cached /metrics renderer: same bytes as the registry renders, re-rendered only when inputs change.

No network here: the snapshot and API stats are built directly, and the clock is injected.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import shutil
import struct
import zlib
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from subprocess import PIPE

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import labels, make_config, parse_samples, usage_schedules
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from exporter import exposition as exposition_module
from exporter.catalogue.declare import Point
from exporter.catalogue.usage import EXTRA_PREFIX, V2_FIELDS
from exporter.collector import ApiStats, ExporterCollector, ReloadStatus, build_registry
from exporter.config import Config
from exporter.exposition import (
    MAX_FORMATS,
    RENDERS_PER_YIELD,
    Exposition,
    _Tail,
    metrics_handler,
)
from exporter.shard import Shard, owner
from exporter.snapshot import Snapshot
from exporter.transport import Attempt, ErrorReason

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
NOW = 1_800_000_000.0
VALUES = {"sessions_count": 120, "searches_count": 340, "prs_opened": 12, "prs_closed": 9, "prs_merged": 7}
# Label values that need escaping in both formats, and non-ASCII ones.
TRICKY_SETS = r"""
- name: plain
- name: 'quote " and backslash \ here'
  labels: {team: "new\nline", tier: "ünïcødé ✓"}
- name: mobile
  windows: [24h, today]
"""


@dataclass
class Clock:
    now: float = NOW

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    """A snapshot the test replaces at will, API stats, and an Exposition reading both."""

    config: Config
    clock: Clock = field(default_factory=Clock)
    stats: ApiStats = field(default_factory=ApiStats)

    def __post_init__(self) -> None:
        self.snapshot = Snapshot.empty(self.config)
        self.stats.track(s.name for s in self.config.org_sets)
        collector = ExporterCollector(lambda: self.snapshot, self.stats, ReloadStatus(True, NOW), self.clock)
        self.registry = build_registry(collector)
        self.monotonic = Clock(0.0)
        self.exposition = Exposition(collector, lambda: self.snapshot, self.stats, self.registry,
                                     clock=self.clock, monotonic=self.monotonic)

    def succeed(self, org_set: str, window: str, values: dict[str, float] | None = None,
                at: float | None = None) -> None:
        # A v2 usage reply's fields as the points the declaration makes of them.
        points = [Point(V2_FIELDS.get(f, EXTRA_PREFIX + f), v) for f, v in (values or VALUES).items()]
        result = self.snapshot.result(org_set, "usage", window).succeeded(points, at or self.clock.now)
        self.snapshot = self.snapshot.with_result(org_set, ("usage", window), result)

    def fail(self, org_set: str, window: str, reason: str = "server_error") -> None:
        result = self.snapshot.result(org_set, "usage", window).failed(reason, self.clock.now)
        self.snapshot = self.snapshot.with_result(org_set, ("usage", window), result)

    def succeed_all(self, values: dict[str, float] | None = None) -> None:
        for org_set, window in usage_schedules(self.snapshot):
            self.succeed(org_set.name, window.name, values)

    def reload(self, config: Config) -> None:
        self.config = config
        self.snapshot = self.snapshot.with_config(config, _usage_slots(self.snapshot))
        self.stats.track(s.name for s in config.org_sets)

    async def scrape(self, accept: str = "", *, gzip: bool = False) -> bytes:
        parts, _ = await self.exposition.render(accept, gzip=gzip)
        return b"".join(parts)


def _usage_slots(snap: Snapshot) -> dict[str, frozenset[tuple[str, str | None]]]:
    """Org set -> its usage slots: what a reload that changes no schedule keeps."""
    slots: dict[str, set[tuple[str, str | None]]] = {}
    for org_set, window in usage_schedules(snap):
        slots.setdefault(org_set.name, set()).add(("usage", window.name))
    return {name: frozenset(kept) for name, kept in slots.items()}


def _config(org_sets: str = TRICKY_SETS, **kw: object) -> Config:
    return make_config("http://127.0.0.1:9", org_sets, **kw)  # type: ignore[arg-type]


def _many(count: int) -> str:
    return "\n".join(f"- name: set-{i:04d}" for i in range(count))


# process_* and python_gc_* values move between any two renderings; everything else must not.
_VOLATILE = re.compile(rb"^(process_|python_gc_)\S*[ {].*\n", re.MULTILINE)


def _stable(body: bytes) -> bytes:
    return _VOLATILE.sub(b"", body)


def _cached_part(body: bytes) -> bytes:
    """The bytes served from cache: everything before the exporter's own per-scrape families."""
    return body[: body.index(b"# HELP devin_exporter_build_info")]


async def _assert_same_as_registry(rig: Rig) -> None:
    for accept, reference in (("", generate_latest), (OPENMETRICS, generate_openmetrics)):
        expected = _stable(reference(rig.registry))
        assert _stable(await rig.scrape(accept)) == expected
        assert _stable(gzip.decompress(await rig.scrape(accept, gzip=True))) == expected


def _observe(stats: ApiStats, org_set: str, status: int | None = 200, reason: ErrorReason | None = None,
             duration: float = 0.2) -> None:
    stats.observe(Attempt(org_set, status, reason, duration))


# --- identical output ----------------------------------------------------------------------------


async def test_cached_exposition_is_byte_identical_to_the_registrys_in_both_formats() -> None:
    rig = Rig(_config(windows="[1h, 24h]", stale_after=1))
    await _assert_same_as_registry(rig)  # nothing polled yet: devin_up 0, empty families
    rig.succeed_all()
    rig.succeed("plain", "1h", {**VALUES, "acus_used": 1.5, "bad-name": 3})  # an extra field, a bad one
    rig.fail("mobile", "today")
    _observe(rig.stats, "plain")
    _observe(rig.stats, "mobile", 503, ErrorReason.SERVER_ERROR, 31.0)
    _observe(rig.stats, "mobile", None, ErrorReason.TIMEOUT, 5.0)
    await _assert_same_as_registry(rig)
    rig.clock.now += 3600 * 1.5  # 1h windows are stale now, 24h ones are not
    await _assert_same_as_registry(rig)


async def test_many_org_sets_across_blocks_stay_identical_through_changes_and_reloads() -> None:
    rig = Rig(_config(_many(120), windows="[1h, 24h, 7d]"))
    rig.succeed_all()
    for i in range(0, 120, 7):
        _observe(rig.stats, f"set-{i:04d}")
    await _assert_same_as_registry(rig)
    rig.succeed("set-0061", "24h", {**VALUES, "sessions_count": 1})
    rig.succeed("set-0119", "7d", {**VALUES, "extra_field": 2})  # a new family, from the last set
    await _assert_same_as_registry(rig)
    # A reload that removes some sets, adds others and renames the order.
    rig.reload(_config(_many(60) + "\n" + "\n".join(f"- name: new-{i}" for i in range(30)),
                       windows="[1h, 24h, 7d]"))
    await _assert_same_as_registry(rig)


async def test_a_shard_with_no_org_sets_still_renders_its_health_families() -> None:
    rig = Rig(_config("- name: only"))
    rig.succeed_all()
    await rig.scrape()
    other = 1 - owner("only", 2)
    rig.reload(_config("- name: only").with_shard(Shard(other, 2)))
    assert rig.config.org_sets == ()
    await _assert_same_as_registry(rig)
    text = (await rig.scrape(OPENMETRICS)).decode()
    families = {f.name for f in parse_openmetrics(text)}  # type: ignore[no-untyped-call]
    assert {"devin_up", "devin_exporter_api_requests", "devin_exporter_build_info"} <= families


async def test_promtool_accepts_the_decompressed_gzip_exposition() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    rig = Rig(_config(_many(40)))
    rig.succeed_all()
    _observe(rig.stats, "set-0003", 429, ErrorReason.RATE_LIMITED)
    text = gzip.decompress(await rig.scrape(gzip=True))
    process = await asyncio.create_subprocess_exec(promtool, "check", "metrics", stdin=PIPE, stdout=PIPE,
                                                   stderr=PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(text), 20)
    assert (process.returncode, stdout.decode(), stderr.decode()) == (0, "", "")


async def test_gzip_body_is_one_well_formed_gzip_member() -> None:
    # Assembled from cached deflate pieces, it must still be a single member with a correct CRC
    # and length: clients that stop after the first member (curl) must see everything.
    rig = Rig(_config(_many(50)))
    rig.succeed_all()
    body = await rig.scrape(gzip=True)
    assert body[:3] == b"\x1f\x8b\x08"
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip wrapper, exactly one member
    text = inflater.decompress(body)
    assert inflater.eof and inflater.unused_data == b""
    crc, size = struct.unpack("<II", body[-8:])
    assert (crc, size) == (zlib.crc32(text), len(text))
    assert _stable(text) == _stable(generate_latest(rig.registry))
    assert len(body) < len(text) / 5  # compressed pieces, not stored ones


# --- caching and invalidation -----------------------------------------------------------------


async def test_repeated_scrapes_with_nothing_changed_serve_the_same_bytes_without_rendering() -> None:
    rig = Rig(_config(_many(20)))
    rig.succeed_all()
    first = await rig.scrape()
    first_gzip = await rig.scrape(gzip=True)
    renders = rig.exposition.renders
    for _ in range(3):
        assert _cached_part(await rig.scrape()) == _cached_part(first)
        again = await rig.scrape(gzip=True)
        assert again[: len(first_gzip) // 2] == first_gzip[: len(first_gzip) // 2]  # cached deflate pieces
    assert rig.exposition.renders == renders


async def test_a_snapshot_change_re_renders_only_the_org_set_that_changed() -> None:
    rig = Rig(_config(_many(30)))
    rig.succeed_all()
    await rig.scrape()
    renders = rig.exposition.renders
    rig.succeed("set-0012", "1h", {**VALUES, "sessions_count": 99999})
    samples = parse_samples((await rig.scrape()).decode())
    assert samples["devin_usage_sessions"][labels(org="set-0012", window="1h")] == 99999
    assert rig.exposition.renders == renders + 2  # its usage chunk and its health chunk


async def test_an_api_stats_change_re_renders_that_org_sets_counters_only() -> None:
    rig = Rig(_config(_many(30)))
    rig.succeed_all()
    await rig.scrape()
    renders = rig.exposition.renders
    _observe(rig.stats, "set-0007", 500, ErrorReason.SERVER_ERROR)
    samples = parse_samples((await rig.scrape()).decode())
    where = {"collector": "usage", "org": "set-0007"}
    assert samples["devin_exporter_api_requests_total"][labels(**where, code="500")] == 1
    assert samples["devin_exporter_api_errors_total"][labels(**where, reason="server_error")] == 1
    assert rig.exposition.renders == renders + 1


async def test_cached_body_expires_exactly_at_the_staleness_horizon() -> None:
    rig = Rig(_config("- name: a\n- name: b", windows="[1h, {range: 24h, interval: 6h}]", stale_after=2))
    rig.succeed_all()
    rig.clock.now += 1800
    rig.succeed("b", "1h")  # b's 1h window goes stale half an hour after a's
    rig.clock.now -= 1800
    key_a = labels(org="a", window="1h")
    key_b = labels(org="b", window="1h")
    horizon = NOW + 2 * 3600  # a's 1h: last success + stale_after x interval
    rig.clock.now = horizon
    samples = parse_samples((await rig.scrape()).decode())
    assert key_a in samples["devin_usage_sessions"] and key_b in samples["devin_usage_sessions"]
    renders = rig.exposition.renders
    rig.clock.now = horizon  # still at the horizon: served from cache
    await rig.scrape()
    assert rig.exposition.renders == renders
    rig.clock.now = horizon + 0.001  # just past it: a's 1h series are gone, nothing else changed
    samples = parse_samples((await rig.scrape()).decode())
    assert key_a not in samples["devin_usage_sessions"] and key_b in samples["devin_usage_sessions"]
    assert labels(org="a", window="24h") in samples["devin_usage_sessions"]
    assert samples["devin_usage_last_success_timestamp_seconds"][key_a] == NOW  # health stays
    assert rig.exposition.renders == renders + 1  # only a's usage chunk
    rig.clock.now = horizon + 1800.001  # and past b's
    assert key_b not in parse_samples((await rig.scrape()).decode())["devin_usage_sessions"]
    await _assert_same_as_registry(rig)


async def test_a_clock_that_steps_back_re_renders_series_that_were_stale() -> None:
    rig = Rig(_config("- name: a", windows="[1h]", stale_after=1))
    rig.succeed_all()
    rig.clock.now = NOW + 3601
    assert "devin_usage_sessions" not in parse_samples((await rig.scrape()).decode())
    rig.clock.now = NOW + 10  # e.g. NTP stepped the clock back
    samples = parse_samples((await rig.scrape()).decode())
    assert labels(org="a", window="1h") in samples["devin_usage_sessions"]


async def test_a_reload_re_renders_only_the_org_sets_it_changed() -> None:
    # At 1,000 org sets a full re-render takes seconds, and a scrape after a reload waits for it.
    rig = Rig(_config(_many(30)))
    rig.succeed_all()
    await rig.scrape()
    await rig.scrape(OPENMETRICS, gzip=True)
    renders = rig.exposition.renders
    rig.reload(_config(_many(30).replace("- name: set-0004", "- name: set-0004\n  labels: {team: x}")
                       + "\n- name: set-new"))
    rig.succeed("set-0004", "1h")
    for window in ("1h", "24h"):
        rig.succeed("set-new", window)
    await _assert_same_as_registry(rig)
    # Per format: usage and health chunks of the new set and the relabelled one, the new set's API counters.
    assert rig.exposition.renders - renders == 2 * (2 * 2 + 1)
    assert 'team="x"' in (await rig.scrape()).decode()


async def test_config_reload_changes_the_help_text_and_labels_of_every_org_set() -> None:
    rig = Rig(_config("- name: a", interval="1h"))
    rig.succeed_all()
    await rig.scrape()
    rig.reload(_config("- name: a\n  labels: {team: x}", interval="30m"))
    rig.succeed_all()
    text = (await rig.scrape()).decode()
    assert "every 30m" in text and 'team="x"' in text and "every 1h" not in text
    await _assert_same_as_registry(rig)


async def test_process_and_python_values_are_read_at_most_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    rig = Rig(_config(_many(3)))
    runtime = rig.exposition._fresh._runtime
    reads = 0
    collect = runtime.collect

    def counting_collect() -> Iterable[Metric]:
        nonlocal reads
        reads += 1
        return collect()

    monkeypatch.setattr(runtime, "collect", counting_collect)
    for _ in range(3):
        assert b"process_" in await rig.scrape()
    assert reads == 1
    rig.monotonic.now += exposition_module.RUNTIME_SECONDS
    assert b"process_" in gzip.decompress(await rig.scrape(OPENMETRICS, gzip=True))  # one reading for all formats
    assert reads == 2


# --- background refresh -----------------------------------------------------------------------


async def test_background_refresh_renders_changes_so_the_next_scrape_renders_nothing() -> None:
    rig = Rig(_config(_many(20)))
    rig.succeed_all()
    await rig.scrape(OPENMETRICS, gzip=True)
    rig.monotonic.now += 15  # scraped every 15 s
    await rig.scrape(OPENMETRICS, gzip=True)
    rig.monotonic.now += 10
    rig.succeed("set-0004", "1h", {**VALUES, "sessions_count": 4242})
    _observe(rig.stats, "set-0004")
    await rig.exposition.refresh()
    renders = rig.exposition.renders
    assert renders > 0
    text = gzip.decompress(await rig.scrape(OPENMETRICS, gzip=True)).decode()
    assert rig.exposition.renders == renders  # the refresh did this scrape's work
    assert 'devin_usage_sessions{org="set-0004",window="1h"} 4242.0' in text


async def test_background_refresh_only_keeps_formats_that_are_scraped_regularly() -> None:
    rig = Rig(_config(_many(5)))
    rig.succeed_all()
    await rig.scrape()  # once, as a person with curl would: not kept up to date
    renders = rig.exposition.renders
    rig.succeed("set-0001", "1h", {**VALUES, "sessions_count": 1})
    await rig.exposition.refresh()
    assert rig.exposition.renders == renders
    rig.monotonic.now += 30
    await rig.scrape()  # a second scrape, 30 s later, renders the change itself
    assert rig.exposition.renders == renders + 2
    rig.monotonic.now += 50  # within two intervals: kept up to date
    rig.succeed("set-0002", "1h", {**VALUES, "sessions_count": 2})
    await rig.exposition.refresh()
    assert rig.exposition.renders == renders + 4
    rig.monotonic.now += 11  # 61 s since the last scrape, more than two intervals: left alone
    rig.succeed("set-0003", "1h", {**VALUES, "sessions_count": 3})
    await rig.exposition.refresh()
    assert rig.exposition.renders == renders + 4


class _Refreshing:
    """Exposition.run() in the background, as the daemon runs it, but refreshing only when the test
    calls refresh(): its sleep never returns."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig

    async def __aenter__(self) -> _Refreshing:
        async def sleep_forever(_: float) -> None:
            await asyncio.Event().wait()

        self._task = asyncio.create_task(self.rig.exposition.run(every=0.25, sleep=sleep_forever))
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def _scraped_regularly(rig: Rig, *, gzip: bool = False) -> bytes:
    """Scrape twice, 15 s apart: the background refresh now keeps this format up to date."""
    await rig.scrape(OPENMETRICS, gzip=gzip)
    rig.monotonic.now += 15
    return await rig.scrape(OPENMETRICS, gzip=gzip)


def _sessions(body: bytes, org_set: str) -> float:
    return parse_samples(body.decode())["devin_usage_sessions"][labels(org=org_set, window="1h")]


async def test_while_refreshed_in_the_background_a_scrape_sends_the_last_body_instead_of_rendering() -> None:
    rig = Rig(_config(_many(20)))
    rig.succeed_all()
    async with _Refreshing(rig):
        before = await _scraped_regularly(rig)
        rig.succeed("set-0003", "1h", {**VALUES, "sessions_count": 99})
        rig.monotonic.now += 0.5  # less than max_lag since the body was last known up to date
        renders = rig.exposition.renders
        lagging = await rig.scrape(OPENMETRICS)
        assert rig.exposition.renders == renders  # it did not wait for a render ...
        assert _cached_part(lagging) == _cached_part(before)  # ... and sent the previous body
        await rig.exposition.refresh()  # what the background task does every 0.25 s
        assert _sessions(await rig.scrape(OPENMETRICS), "set-0003") == 99


async def test_a_body_older_than_max_lag_is_not_sent_the_scrape_renders_a_fresh_one() -> None:
    rig = Rig(_config(_many(20)))
    rig.succeed_all()
    async with _Refreshing(rig):
        await _scraped_regularly(rig)
        rig.succeed("set-0003", "1h", {**VALUES, "sessions_count": 99})
        rig.monotonic.now += rig.exposition.max_lag + 0.001  # since it was last known up to date
        assert _sessions(await rig.scrape(OPENMETRICS), "set-0003") == 99


async def test_without_the_background_refresh_or_for_a_one_off_format_scrapes_are_up_to_date() -> None:
    rig = Rig(_config(_many(20)))
    rig.succeed_all()
    await _scraped_regularly(rig)  # no background refresh running: nothing would catch up
    rig.succeed("set-0003", "1h", {**VALUES, "sessions_count": 99})
    assert _sessions(await rig.scrape(OPENMETRICS), "set-0003") == 99
    async with _Refreshing(rig):
        await rig.scrape()  # text, scraped once: not kept up to date, so never sent late
        rig.succeed("set-0003", "1h", {**VALUES, "sessions_count": 100})
        assert parse_samples((await rig.scrape()).decode())["devin_usage_sessions"][
            labels(org="set-0003", window="1h")] == 100


async def test_a_late_body_is_never_sent_across_a_reload_or_past_a_staleness_horizon() -> None:
    rig = Rig(_config(_many(3), stale_after=2))
    rig.succeed_all()
    async with _Refreshing(rig):
        await _scraped_regularly(rig)
        rig.reload(_config(_many(4), stale_after=2))
        assert "set-0003" in (await rig.scrape(OPENMETRICS)).decode()  # the new org set, at once
        await _scraped_regularly(rig)
        rig.clock.now += 2 * 3600 + 1  # 1h window, 2 intervals without a success: its series go
        body = (await rig.scrape(OPENMETRICS)).decode()
        assert labels(org="set-0000", window="1h") not in parse_samples(body).get("devin_usage_sessions", {})


async def test_a_prepared_reload_is_rendered_before_the_switch_and_never_mixed_with_the_old_config(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The service prepares a reload's bodies (Exposition.prepare) before it switches: meanwhile
    # scrapes get the old config's body, and after the switch only what changed since is rendered.
    monkeypatch.setattr(exposition_module, "RENDERS_PER_YIELD", 1)  # yield after every chunk
    rig = Rig(_config(_many(20)))
    rig.succeed_all()
    async with _Refreshing(rig):
        before = gzip.decompress(await _scraped_regularly(rig, gzip=True))
        new_config = _config(_many(20).replace("- name: set-0004", "- name: set-0004\n  labels: {team: x}")
                             + "\n- name: set-new")
        preparing = asyncio.create_task(rig.exposition.prepare(rig.snapshot.with_config(new_config,
                                                                                         _usage_slots(rig.snapshot))))
        await asyncio.sleep(0)
        assert not preparing.done()
        during = gzip.decompress(await rig.scrape(OPENMETRICS, gzip=True))  # the old config's body, whole
        assert _cached_part(during) == _cached_part(before) and b"set-new" not in during
        await preparing
        rig.succeed("set-0007", "1h", {**VALUES, "sessions_count": 42})  # a poll between prepare and switch
        renders = rig.exposition.renders
        rig.reload(new_config)
        after = gzip.decompress(await rig.scrape(OPENMETRICS, gzip=True)).decode()
        # set-0007's usage and health chunks, and the API counters of the new set only.
        assert rig.exposition.renders - renders == 2 + 1
        assert 'org="set-new"' in after and 'team="x"' in after
        assert _sessions(after.encode(), "set-0007") == 42
        await _assert_same_as_registry(rig)


async def test_a_scrape_that_waits_for_the_render_after_a_reload_gets_that_render_not_one_more(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Right after a reload a scrape cannot be sent the old config's body, so it waits for the
    # background refresh's render; a poll result that comes in meanwhile must not make it wait for
    # a second render (at 1,000 org sets each is tens of ms): it may be one refresh late, as always.
    monkeypatch.setattr(exposition_module, "RENDERS_PER_YIELD", 1)  # yield after every chunk
    rig = Rig(_config(_many(20)))
    rig.succeed_all()
    async with _Refreshing(rig):
        await _scraped_regularly(rig, gzip=True)
        rig.reload(_config(_many(20) + "\n- name: set-new"))  # not prepared: the refresh renders it
        refreshing = asyncio.create_task(rig.exposition.refresh())
        await asyncio.sleep(0)
        assert not refreshing.done()
        scraping = asyncio.create_task(rig.scrape(OPENMETRICS, gzip=True))
        await asyncio.sleep(0)
        rig.succeed("set-0007", "1h", {**VALUES, "sessions_count": 42})  # while both are under way
        await refreshing
        renders = rig.exposition.renders
        body = gzip.decompress(await scraping)
        assert rig.exposition.renders == renders  # nothing rendered for the scrape itself
        assert b'org="set-new"' in body  # the new config's body ...
        assert _sessions(body, "set-0007") != 42  # ... as the refresh rendered it, before that poll
        await rig.exposition.refresh()  # the next refresh brings it up to date
        assert _sessions(gzip.decompress(await rig.scrape(OPENMETRICS, gzip=True)), "set-0007") == 42
        await _assert_same_as_registry(rig)


async def test_a_body_sent_while_the_next_is_being_rendered_is_intact(monkeypatch: pytest.MonkeyPatch) -> None:
    # The segments change in place while a render runs; a body already made must not change with
    # them: its gzip CRC and every line must stay those of the moment it was rendered.
    monkeypatch.setattr(exposition_module, "RENDERS_PER_YIELD", 1)  # yield after every chunk
    rig = Rig(_config(_many(60)))
    rig.succeed_all()
    async with _Refreshing(rig):
        plain = await _scraped_regularly(rig)
        packed = await _scraped_regularly(rig, gzip=True)
        for org_set in rig.config.org_sets:
            rig.succeed(org_set.name, "1h", {**VALUES, "sessions_count": 7})
        render = asyncio.create_task(rig.exposition.refresh())
        during: list[tuple[bytes, bytes]] = []
        while not render.done():
            during.append((await rig.scrape(OPENMETRICS), await rig.scrape(OPENMETRICS, gzip=True)))
            await asyncio.sleep(0)  # let the render go on
        await render
    assert len(during) > 10  # scrapes kept being answered while the render ran
    for text, compressed in during:
        assert _cached_part(text) == _cached_part(plain)
        assert _cached_part(gzip.decompress(compressed)) == _cached_part(plain)  # checks CRC and size
    assert _cached_part(gzip.decompress(packed)) == _cached_part(plain)
    assert _sessions(await rig.scrape(OPENMETRICS), "set-0059") == 7


async def test_background_refresh_loop_keeps_going_after_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(_config(_many(2)))
    calls = 0

    async def refresh(every: float) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")

    sleeps = 0

    async def sleep(_: float) -> None:
        nonlocal sleeps
        sleeps += 1
        if calls >= 3 or sleeps > 10:  # bounded, whatever run() does
            raise asyncio.CancelledError
        await asyncio.sleep(0)

    rig.exposition.refresh = refresh  # type: ignore[method-assign]
    with pytest.raises(asyncio.CancelledError):
        await rig.exposition.run(every=0.25, sleep=sleep)
    assert calls == 3
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "rendering /metrics in the background failed; scrapes render it themselves"]


# --- concurrency ------------------------------------------------------------------------------


async def _loop_turns_during(work: Awaitable[object]) -> int:
    """How often another task got the event loop while `work` ran."""
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    start = ticks
    await work
    during = ticks - start
    done = True
    await task
    return during


async def test_a_full_render_yields_to_the_event_loop_so_polling_is_not_stalled() -> None:
    rig = Rig(_config(_many(4 * RENDERS_PER_YIELD)))
    rig.succeed_all()
    during = await _loop_turns_during(rig.scrape())
    assert during >= 4  # the ticker ran between batches of chunk renders, not only after


async def test_rerendering_many_org_sets_api_counters_yields_to_the_event_loop() -> None:
    rig = Rig(_config(_many(4 * RENDERS_PER_YIELD)))
    rig.succeed_all()
    await rig.scrape()
    for org_set in rig.config.org_sets:  # every org set's API counters moved since that scrape
        _observe(rig.stats, org_set.name)
    during = await _loop_turns_during(rig.scrape())
    assert during >= 4


async def test_concurrent_scrapes_render_each_chunk_once_and_agree() -> None:
    rig = Rig(_config(_many(3 * RENDERS_PER_YIELD)))
    rig.succeed_all()
    bodies = await asyncio.gather(*(rig.scrape() for _ in range(4)))
    assert len({_cached_part(b) for b in bodies}) == 1
    assert rig.exposition.renders == 3 * len(rig.config.org_sets)  # usage, health and API chunks


async def test_formats_are_cached_separately_and_their_number_is_bounded() -> None:
    rig = Rig(_config(_many(5)))
    rig.succeed_all()
    text = await rig.scrape()
    openmetrics = await rig.scrape(OPENMETRICS)
    assert not text.endswith(b"# EOF\n") and openmetrics.endswith(b"# EOF\n")
    for minor in range(MAX_FORMATS + 3):  # clients may ask for any number of versions
        await rig.scrape(f"application/openmetrics-text; version=1.0.{minor}")
    assert len(rig.exposition._formats) == MAX_FORMATS
    assert _stable(await rig.scrape()) == _stable(generate_latest(rig.registry))


# --- the per-scrape tail ------------------------------------------------------------------------


class _Changing:
    """Families whose values change on every collect, and whose layout changes on demand."""

    def __init__(self) -> None:
        self.calls = 0
        self.extra_label = False

    def collect(self) -> list[Metric]:
        self.calls += 1
        gauge = Metric("process_thing", "A thing with \\ and \n in its help", "gauge")
        gauge.add_sample("process_thing", {}, self.calls * 1.5)
        counter = Metric("python_events", "Events", "counter")
        for generation in ("0", "1"):
            counter.add_sample("python_events_total", {"generation": generation}, float(self.calls ** 7))
        if self.extra_label:
            counter.add_sample("python_events_total", {"generation": "2"}, 1e-9)
        empty = Metric("devin_nothing", "No samples", "gauge")
        info = Metric("devin_exporter_build_info", "Info", "gauge")
        info.add_sample("devin_exporter_build_info", {"version": 'v"1"'}, 1.0)
        return [gauge, counter, empty, info]


@pytest.mark.parametrize("encoder", [generate_latest, generate_openmetrics])
def test_the_tail_formats_new_values_into_the_layout_exactly_as_the_encoder_would(encoder: object) -> None:
    source = _Changing()
    tail = _Tail(source, encoder)  # type: ignore[arg-type]
    reference = _Changing()
    for _ in range(4):
        assert tail.render() == encoder(reference)  # type: ignore[operator]
    assert tail._layout is not None  # later renders used the layout, not the encoder
    source.extra_label = reference.extra_label = True  # a new sample: the layout no longer fits
    assert tail.render() == encoder(reference)  # type: ignore[operator]
    assert tail.render() == encoder(reference)  # type: ignore[operator]


# --- over HTTP ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream_above", [0, 1 << 30])
async def test_metrics_over_http_sends_the_whole_body_with_its_length_and_head_sends_none(
    stream_above: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(exposition_module, "STREAM_ABOVE", stream_above)  # streamed in parts, or joined
    rig = Rig(_config(_many(30)))
    rig.succeed_all()
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(rig.exposition))
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        response = await client.get("/metrics", headers={"Accept-Encoding": "identity"})
        body = await response.read()
        assert response.headers["Content-Length"] == str(len(body))
        assert "Content-Encoding" not in response.headers
        assert _stable(body) == _stable(generate_latest(rig.registry))
        response = await client.get("/metrics", headers={"Accept-Encoding": "gzip", "Accept": OPENMETRICS},
                                    auto_decompress=False)
        body = await response.read()
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Content-Length"] == str(len(body))
        assert _stable(gzip.decompress(body)) == _stable(generate_openmetrics(rig.registry))
        response = await client.head("/metrics")
        assert response.status == 200 and await response.read() == b""
        assert int(response.headers["Content-Length"]) > 1000
