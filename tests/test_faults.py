"""Fault injection over real sockets: what the exporter does on a bad upstream day.

The simulator (or a raw socket server) misbehaves; the exporter runs in-process with its HTTP app
on loopback. Time is a HybridClock shared by both: it runs with real time, and the test jumps it
ahead to cross poll intervals, `stale_after` and Retry-After pauses without waiting for them. The
schedules poll by themselves when a jump makes them due; nothing here calls the poller directly
except where a test needs several polls at one instant (the Retry-After tests).

For every fault: the process stays up, /metrics keeps answering, `devin_up` and the error counters
name the reason, the last good values stay until `stale_after` intervals and then go, one log line
marks the change (not one per poll), and the exporter recovers by itself when the upstream does.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from email.utils import format_datetime

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hardening_support import HybridClock, free_port, start_resetting_server
from helpers import KEY, USAGE_METRICS, labels, make_config, parse_samples, usage_schedules, wait_until

from exporter.logs import LogfmtFormatter
from exporter.poller import Poller
from exporter.server import create_app
from exporter.service import Exporter
from exporter.simulator import (
    REQUESTS_KEY,
    Faults,
    RecordedRequest,
    expected_usage,
    parse_datetime,
    start_simulator,
)

Samples = dict[str, dict[frozenset[tuple[str, str]], float]]
INTERVAL = 60.0


@dataclass
class Upstream:
    """The simulator on a fixed port, which a test may stop, replace and bring back."""

    port: int
    faults: Faults
    clock: HybridClock
    sim: web.AppRunner | None = None
    raw: asyncio.Server | None = None
    history: list[RecordedRequest] = field(default_factory=list)  # requests of stopped simulators

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.sim, _ = await start_simulator(
            port=self.port, api_key=KEY, faults=self.faults, clock=self.clock.datetime
        )

    async def stop(self) -> None:
        if self.sim is not None:
            self.history.extend(self.requests())
            await self.sim.cleanup()
            self.sim = None
        if self.raw is not None:
            self.raw.close()
            await self.raw.wait_closed()
            self.raw = None

    async def start_resetting(self) -> None:
        self.raw, _ = await start_resetting_server(self.port)

    def requests(self) -> list[RecordedRequest]:
        return list(self.sim.app[REQUESTS_KEY]) if self.sim is not None else []  # type: ignore[index]

    def all_requests(self) -> list[RecordedRequest]:
        return self.history + self.requests()


@dataclass
class Rig:
    clock: HybridClock
    up: Upstream
    exporter: Exporter
    client: TestClient[web.Request, web.Application]

    @property
    def faults(self) -> Faults:
        return self.up.faults

    @property
    def poller(self) -> Poller:
        assert self.exporter._poller is not None
        return self.exporter._poller

    async def samples(self) -> Samples:
        response = await self.client.get("/metrics")
        assert response.status == 200
        return parse_samples(await response.text())

    def attempts(self, org: str, window: str) -> float | None:
        return self.exporter.snapshot.result(org, "usage", window).last_attempt

    async def next_poll(self, seconds: float = INTERVAL, *, within: float = 10.0) -> None:
        """Jump the clock; wait for every schedule to finish the poll that made due."""
        before = {
            (s.name, w.name): self.attempts(s.name, w.name) for s, w in usage_schedules(self.exporter.snapshot)
        }
        self.clock.advance(seconds)
        await wait_until(
            lambda: all(self.attempts(*k) != v for k, v in before.items()),
            within=within,
            what="every schedule's next poll",
        )

    async def healthy_process(self) -> None:
        assert self.exporter.alive()
        assert (await self.client.get("/healthz")).status == 200

    async def poll_now(self, org: str, window: str = "1h") -> bool:
        org_set = next(s for s in self.exporter.config.org_sets if s.name == org)
        w = next(w for w in org_set.windows if w.name == window)
        return await self.poller.poll(self.poller.key("usage", org_set, w))


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig() -> AsyncIterator[RigFactory]:
    rigs: list[Rig] = []

    async def make(
        org_sets: str = "- name: enterprise",
        *,
        upstream: bool = True,
        random: float = 0.0,
        **config_kw: object,
    ) -> Rig:
        clock = HybridClock()
        up = Upstream(free_port(), Faults(), clock)
        if upstream:
            await up.start()
        config_kw = {
            "windows": "[1h]",
            "interval": "1m",
            "stale_after": 2,
            "retries": 1,
            "timeout": "500ms",
            **config_kw,
        }
        config = make_config(up.url, org_sets, **config_kw)  # type: ignore[arg-type]
        exporter = Exporter(
            config, clock=clock.time, monotonic=clock.monotonic, sleep=clock.sleep, random=lambda: random
        )
        client = TestClient(TestServer(create_app(exporter), host="127.0.0.1"))
        # These tests assert what a scrape shows right after a poll; the up to 1 s lag a regularly
        # scraped /metrics may show while it is re-rendered is tested in test_exposition.py.
        exporter.exposition.max_lag = 0.0
        rig = Rig(clock, up, exporter, client)
        rigs.append(rig)
        await client.start_server()
        await wait_until(
            lambda: all(rig.attempts(s.name, w.name) is not None for s, w in usage_schedules(exporter.snapshot)),
            what="first polls",
        )
        return rig

    yield make
    for rig in reversed(rigs):
        await rig.client.close()
        await rig.up.stop()


def nonzero(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """A counter family without the series published at 0 from start-up."""
    return {lbls: v for lbls, v in samples.get(name, {}).items() if v}


def usage(samples: Samples) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(name, lbls): v for name in USAGE_METRICS.values() for lbls, v in samples.get(name, {}).items()}


def expected_from(
    request: RecordedRequest, org: str = "enterprise", window: str = "1h"
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """What the simulator answered to `request` (its window, clipped at its own end)."""
    start, end = parse_datetime(request.query["start_date"][0]), parse_datetime(request.query["end_date"][0])
    counts = expected_usage(
        request.query.get("org_ids", []), request.query.get("user_ids", []), start, end, now=end
    )
    return {(USAGE_METRICS[f], labels(org=org, window=window)): float(v) for f, v in counts.items()}


def poll_failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.levelno == logging.WARNING and r.getMessage().startswith("poll failed")
    ]


# --------------------------------------------------------------------------------------------
# every fault, the whole life cycle


@dataclass(frozen=True)
class Fault:
    name: str
    inject: Callable[[Upstream], Awaitable[None]]
    clear: Callable[[Upstream], Awaitable[None]]
    reason: str
    code: str | None  # the status counted in devin_exporter_api_requests_total, if a response came
    retried: bool
    log: str  # in the one warning line


def _faults(
    **changes: object,
) -> tuple[Callable[[Upstream], Awaitable[None]], Callable[[Upstream], Awaitable[None]]]:
    async def inject(up: Upstream) -> None:
        up.faults.update(changes)

    async def clear(up: Upstream) -> None:
        up.faults.reset()

    return inject, clear


async def _refuse(up: Upstream) -> None:
    await up.stop()  # nothing listens on the port any more


async def _reset(up: Upstream) -> None:
    await up.stop()
    await up.start_resetting()


async def _restart(up: Upstream) -> None:
    await up.stop()
    await up.start()


FAULTS = [
    Fault(
        "5xx with an HTML body",
        *_faults(status=503),
        "server_error",
        "503",
        True,
        "HTTP 503 Service Unavailable: 503 Service Unavailable",
    ),
    Fault(
        "429 without Retry-After",
        *_faults(status=429, retry_after=None),
        "rate_limited",
        "429",
        True,
        "HTTP 429 Too Many Requests",
    ),
    Fault(
        "401 key revoked", *_faults(status=401), "auth", "401", False, "HTTP 401 Unauthorized: the API key"
    ),
    Fault("403 not an admin key", *_faults(status=403), "auth", "403", False, "HTTP 403 Forbidden"),
    Fault(
        "422",
        *_faults(status=422),
        "client_error",
        "422",
        False,
        "HTTP 422 Unprocessable Entity: the API rejected the request parameters",
    ),
    Fault(
        "redirect", *_faults(redirect=True), "client_error", "302", False, "redirect to /login not followed"
    ),
    Fault("malformed JSON", *_faults(malformed="json"), "invalid_response", "200", False, "body is not JSON"),
    Fault(
        "wrong field types",
        *_faults(malformed="types"),
        "invalid_response",
        "200",
        False,
        "field 'sessions_count' is \"",
    ),
    Fault(
        "negative integer",
        *_faults(malformed="negative"),
        "invalid_response",
        "200",
        False,
        "field 'sessions_count' is negative (-1)",
    ),
    Fault(
        "huge integer",
        *_faults(malformed="huge"),
        "invalid_response",
        "200",
        False,
        "field 'sessions_count' is 18446744073709551616, above 2**53",
    ),
    Fault(
        "missing field",
        *_faults(malformed="missing"),
        "invalid_response",
        "200",
        False,
        "field 'prs_merged' is missing",
    ),
    Fault("empty body", *_faults(malformed="empty"), "invalid_response", "200", False, "body is not JSON"),
    Fault("array body", *_faults(malformed="array"), "invalid_response", "200", False, "not an object"),
    Fault("hanging upstream", *_faults(hang=True), "timeout", None, True, "no complete response within 0.5s"),
    Fault("connection refused", _refuse, _restart, "connection", None, True, "connection failed"),
    Fault("connection reset", _reset, _restart, "connection", None, True, "connection failed"),
]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
async def test_fault_is_reported_keeps_last_values_until_stale_and_recovers_by_itself(
    fault: Fault, make_rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rig = await make_rig()  # one org set, window 1h, polled every 1m, stale after 2 intervals, 1 retry
    good = await rig.samples()
    assert good["devin_up"] == {labels(org="enterprise"): 1.0}
    last_good = usage(good)
    assert last_good == expected_from(rig.up.requests()[-1])
    success_at = good["devin_usage_last_success_timestamp_seconds"][labels(org="enterprise", window="1h")]

    await fault.inject(rig.up)
    await rig.next_poll()  # due: the schedule polls by itself and fails
    await rig.healthy_process()
    failed = await rig.samples()
    attempts = 2 if fault.retried else 1
    assert failed["devin_up"] == {labels(org="enterprise"): 0.0}
    assert nonzero(failed, "devin_exporter_api_errors_total") == {
        labels(collector="usage", org="enterprise", reason=fault.reason): attempts
    }
    codes = Counter({"200": 1})  # the first, good poll
    if fault.code is not None:
        codes[fault.code] += attempts
    assert nonzero(failed, "devin_exporter_api_requests_total") == {
        labels(collector="usage", org="enterprise", code=c): float(n) for c, n in codes.items()
    }
    assert usage(failed) == last_good  # last good values stay ...
    assert failed["devin_usage_last_success_timestamp_seconds"] == {
        labels(org="enterprise", window="1h"): success_at
    }

    rig.clock.advance(INTERVAL - 10)  # ... up to 2 intervals after the last success (no poll due yet)
    assert usage(await rig.samples()) == last_good
    await rig.next_poll(11)  # the second failed poll, past 2 intervals: the usage series go
    stale = await rig.samples()
    assert usage(stale) == {}
    assert stale["devin_up"] == {labels(org="enterprise"): 0.0}  # health series stay, so alerts fire
    assert stale["devin_usage_last_success_timestamp_seconds"] == {
        labels(org="enterprise", window="1h"): success_at
    }
    assert nonzero(stale, "devin_exporter_api_errors_total") == {
        labels(collector="usage", org="enterprise", reason=fault.reason): 2 * attempts
    }
    await rig.healthy_process()

    # One line for the change of state, not one per poll; it says what happened and where.
    (warning,) = poll_failures(caplog)
    assert fault.log in warning.getMessage()
    line = LogfmtFormatter().format(warning)
    assert "org_set=enterprise" in line and "window=1h" in line and f"reason={fault.reason}" in line
    assert "<html" not in line and KEY not in line

    await fault.clear(rig.up)
    await rig.next_poll()  # the upstream is back: the next scheduled poll succeeds, no restart
    back = await rig.samples()
    assert back["devin_up"] == {labels(org="enterprise"): 1.0}
    assert usage(back) == expected_from(rig.up.requests()[-1])
    assert nonzero(back, "devin_exporter_api_errors_total") == nonzero(
        stale, "devin_exporter_api_errors_total"
    )
    recovered = [r for r in caplog.records if r.getMessage() == "poll recovered"]
    assert len(recovered) == 1 and recovered[0].after == fault.reason  # type: ignore[attr-defined]
    assert len(poll_failures(caplog)) == 1


# --------------------------------------------------------------------------------------------
# a hanging upstream does not slow scrapes


async def test_metrics_answers_within_100ms_while_every_poll_hangs(make_rig: RigFactory) -> None:
    sets = "\n".join(f"- name: set{i}\n  org_ids: [org-{i}]" for i in range(8))
    rig = await make_rig(sets, windows="[1h, 24h, 7d]", timeout="5s", retries=0)
    # A first render (cold caches, first OpenMetrics import) is not what this is about; a CI run
    # once spent 0.24 s on it. Warm up before the polls hang.
    for path in ("/metrics", "/healthz", "/readyz", "/"):
        assert (await rig.client.get(path)).status == 200
    rig.faults.hang = True
    rig.clock.advance(INTERVAL)  # 24 polls due at once, all of them hang
    await wait_until(
        lambda: sum(1 for r in rig.up.requests() if r.status is None) == 24,
        what="every poll hanging upstream",
    )
    timings = []
    for _ in range(10):
        started = time.perf_counter()
        response = await rig.client.get("/metrics")
        body = await response.text()
        timings.append(time.perf_counter() - started)
        assert response.status == 200 and "devin_usage_sessions" in body
    assert max(timings) < 0.1, timings
    for path in ("/healthz", "/readyz", "/"):
        started = time.perf_counter()
        assert (await rig.client.get(path)).status == 200
        assert time.perf_counter() - started < 0.1, path
    # Still hanging: nothing has timed out yet, so the scrapes above really overlapped the polls.
    assert sum(1 for r in rig.up.requests() if r.status is None) == 24
    snapshot = rig.exporter.snapshot
    assert all(snapshot.result(s.name, "usage", w.name).ok for s, w in usage_schedules(snapshot))


# --------------------------------------------------------------------------------------------
# Retry-After


# Sleepers on the injected clock while nothing is due: the poll scheduler, until the next due time.
IDLE_SLEEPERS = 1


async def _until_parked(rig: Rig, count: int) -> None:
    await wait_until(lambda: rig.clock.parked() >= count, what=f"{count} sleepers waiting on the clock")


@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_no_request_is_sent_while_a_retry_after_pause_is_in_force(
    form: str, make_rig: RigFactory
) -> None:
    sets = "- name: a\n  org_ids: [org-1]\n- name: b\n  org_ids: [org-2]\n- name: c\n  org_ids: [org-3]"
    rig = await make_rig(sets, interval="1h", retries=2)
    loops = IDLE_SLEEPERS
    await _until_parked(rig, loops)  # the scheduler waits for the next hour
    if form == "seconds":
        retry_after, pause = "30", 30.0
    else:  # an HTTP date 45 s ahead of the (injected) wall clock; whole seconds, so 44 < pause <= 45
        retry_after, pause = format_datetime(rig.clock.datetime() + timedelta(seconds=45), usegmt=True), 44.0
    rig.faults.update({"status": 429, "retry_after": retry_after})

    first = asyncio.create_task(rig.poll_now("a"))
    await wait_until(lambda: any(r.status == 429 for r in rig.up.requests()), what="the 429")
    rig.faults.reset()  # the upstream is fine again at once; the pause must hold anyway
    limited = next(r for r in rig.up.requests() if r.status == 429)
    sent_before = len(rig.up.requests())
    # Other org sets poll during the pause: the limit is per key, so they wait too.
    others = [asyncio.create_task(rig.poll_now(name)) for name in ("b", "c")]
    await _until_parked(rig, loops + 3)
    assert len(rig.up.requests()) == sent_before
    rig.clock.advance(pause - 10)
    await _until_parked(rig, loops + 3)  # woke, saw the pause still on, went back to sleep
    assert len(rig.up.requests()) == sent_before
    rig.clock.advance(10.5)
    assert await asyncio.wait_for(asyncio.gather(first, *others), 10) == [True, True, True]

    after = [r for r in rig.up.requests() if r.time > limited.time]
    assert len(after) == 3
    assert all((r.time - limited.time).total_seconds() >= pause for r in after), [r.time for r in after]
    samples = await rig.samples()
    assert samples["devin_up"] == {labels(org=n): 1.0 for n in "abc"}
    assert nonzero(samples, "devin_exporter_api_errors_total") == {
        labels(collector="usage", org="a", reason="rate_limited"): 1.0
    }


async def _drive(rig: Rig, task: asyncio.Task[bool], *, idle: int, step: float, limit: int = 50) -> bool:
    """Advance the clock by `step` whenever the work under test sleeps, until the task is done."""
    for _ in range(limit):
        await wait_until(lambda: task.done() or rig.clock.parked(0.05) > idle, what="the next wait")
        if task.done():
            return task.result()
        rig.clock.advance(step)
    raise AssertionError("the task did not finish")


async def test_429_storm_with_retry_after_spaces_every_attempt_and_recovers(make_rig: RigFactory) -> None:
    rig = await make_rig("- name: a\n- name: b\n  org_ids: [org-2]", interval="1h", retries=3)
    loops = IDLE_SLEEPERS
    await _until_parked(rig, loops)
    rig.faults.update({"status": 429, "retry_after": "2"})
    sent_before = len(rig.up.requests())
    task = asyncio.create_task(rig.poll_now("a"))
    assert await _drive(rig, task, idle=loops, step=0.5) is False  # 1 + 3 retries, all 429
    storm = rig.up.requests()[sent_before:]
    assert [r.status for r in storm] == [429] * 4
    gaps = [(b.time - a.time).total_seconds() for a, b in itertools.pairwise(storm)]
    assert all(gap >= 2 for gap in gaps), gaps
    samples = await rig.samples()
    assert samples["devin_up"] == {labels(org="a"): 0.0, labels(org="b"): 1.0}
    assert nonzero(samples, "devin_exporter_api_errors_total") == {
        labels(collector="usage", org="a", reason="rate_limited"): 4.0
    }
    assert usage(samples)  # the last good values stay
    await rig.healthy_process()

    rig.faults.reset()
    rig.clock.advance(2)  # the last Retry-After is over
    await rig.next_poll(3600)
    assert (await rig.samples())["devin_up"] == {labels(org="a"): 1.0, labels(org="b"): 1.0}


async def test_429_storm_without_retry_after_backs_off_exponentially(make_rig: RigFactory) -> None:
    # random=1.0 takes the top of every full-jitter range: 1 s, 2 s, 4 s.
    rig = await make_rig(interval="1h", retries=3, random=1.0)
    await _until_parked(rig, 1)
    rig.faults.update({"status": 429, "retry_after": None})
    sent_before = len(rig.up.requests())
    task = asyncio.create_task(rig.poll_now("enterprise"))
    assert await _drive(rig, task, idle=1, step=0.25) is False
    storm = rig.up.requests()[sent_before:]
    gaps = [(b.time - a.time).total_seconds() for a, b in itertools.pairwise(storm)]
    assert len(gaps) == 3 and all(gap >= want for gap, want in zip(gaps, (1, 2, 4), strict=True)), gaps


async def test_simulated_per_key_rate_limit_storm_ends_with_every_schedule_published(
    make_rig: RigFactory,
) -> None:
    sets = "\n".join(f"- name: s{i}\n  org_ids: [org-{i}]" for i in range(4))
    # Each pause ends with every waiting poll sent at once (the client's own rate limit is set very
    # high here), and one of them gets the token: 8 schedules need up to 8 attempts.
    rig = await make_rig(sets, windows="[1h, 24h]", interval="1h", retries=8)
    schedules, loops = len(usage_schedules(rig.exporter.snapshot)), IDLE_SLEEPERS
    await _until_parked(rig, loops)
    rig.faults.rate_limit_per_second = 1.0  # a burst of one, then one per second: a 429 storm
    sent_before = len(rig.up.requests())
    polls = asyncio.gather(*(rig.poll_now(s.name, w.name) for s, w in usage_schedules(rig.exporter.snapshot)))
    task: asyncio.Task[list[bool]] = asyncio.ensure_future(polls)
    for _ in range(60):
        await wait_until(lambda: task.done() or rig.clock.parked(0.05) > loops, what="the next wait")
        if task.done():
            break
        rig.clock.advance(0.5)
    assert task.result() == [True] * schedules
    storm = rig.up.requests()[sent_before:]
    assert any(r.status == 429 for r in storm)
    # Requests come in bursts: those in flight together, then nothing until the Retry-After: 1 of
    # the burst's 429s has passed. A gap between arrivals is either tiny or at least that second.
    times = sorted(r.time for r in storm)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert all(gap < 0.2 or gap >= 1 for gap in gaps), gaps
    assert sum(1 for gap in gaps if gap >= 1) >= 7  # one burst per pause, one success per burst
    samples = await rig.samples()
    assert set(samples["devin_up"].values()) == {1.0}
    assert len(usage(samples)) == 5 * schedules


# --------------------------------------------------------------------------------------------
# 401/403: one line per transition


async def test_key_revocation_logs_one_line_per_org_set_per_transition_not_per_poll_or_window(
    make_rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # Three windows per set: still one line per org set, as the key is the same for all of them.
    rig = await make_rig("- name: a\n- name: b\n  org_ids: [org-2]", stale_after=10, windows="[1h, 24h, 7d]")
    rig.faults.status = 401
    for _ in range(4):
        await rig.next_poll()
    failures = poll_failures(caplog)
    assert sorted(r.org_set for r in failures) == ["a", "b"]  # type: ignore[attr-defined]
    assert all("HTTP 401" in r.getMessage() and r.status == 401 for r in failures)  # type: ignore[attr-defined]
    rig.faults.status = 403  # still an auth failure: no new line
    await rig.next_poll()
    assert len(poll_failures(caplog)) == 2
    samples = await rig.samples()
    assert nonzero(samples, "devin_exporter_api_errors_total") == {
        labels(collector="usage", org="a", reason="auth"): 15.0,
        labels(collector="usage", org="b", reason="auth"): 15.0,
    }  # never retried: 5 polls x 3 windows
    assert samples["devin_up"] == {labels(org="a"): 0.0, labels(org="b"): 0.0}

    rig.faults.reset()
    await rig.next_poll()
    assert sorted(r.org_set for r in caplog.records if r.getMessage() == "poll recovered") == ["a", "b"]  # type: ignore[attr-defined]
    rig.faults.status = 401  # revoked again: a new transition, a new line each
    await rig.next_poll()
    assert len(poll_failures(caplog)) == 4
    assert KEY not in caplog.text
