"""Unit tests for exporter.transport: request shape, error classes, retries, shared limits, key hygiene.

All time is virtual: FakeClock's sleep parks the caller and a driver advances the clock to the
earliest wake-up once the event loop has settled, so nothing here really sleeps.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import pickle
import re
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Final

import aiohttp
import pytest
from aioresponses import CallbackResult, aioresponses
from multidict import CIMultiDict, CIMultiDictProxy
from usage_client import UsageClient, UsageQuery
from yarl import URL

from exporter import USER_AGENT
from exporter import transport as client_module
from exporter.catalogue.declare import format_rfc3339
from exporter.config import ApiSettings, parse_config
from exporter.secret import ApiKey
from exporter.transport import (
    RETRY_AFTER_CAP,
    ApiError,
    Attempt,
    ErrorReason,
    new_session,
    parse_retry_after,
)

KEY: Final = "apk_user_SECRET_TEST_KEY_123"
BASE: Final = "https://api.example.test"
ENDPOINT: Final = f"{BASE}/v2/enterprise/metrics/usage"
ANY_USAGE_URL: Final = re.compile(r"^https://api\.example\.test/v2/enterprise/metrics/usage(\?.*)?$")
GOOD: Final = {"sessions_count": 12, "searches_count": 34, "prs_opened": 5, "prs_closed": 1, "prs_merged": 3}
START: Final = datetime(2026, 11, 23, 18, 0, 0, tzinfo=UTC)
END: Final = datetime(2026, 11, 24, 18, 0, 0, tzinfo=UTC)
WALL_START: Final = 1_795_000_000.0  # unix time the fake wall clock starts at
_SETTLE_YIELDS: Final = 50


# --------------------------------------------------------------------------------------------
# Test doubles


class FakeClock:
    """Virtual monotonic + wall time. `sleep` records the delay and waits for virtual time."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start
        self._wall_offset = WALL_START - start
        self.sleeps: list[float] = []
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._driver: asyncio.Task[None] | None = None

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + self._wall_offset

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._heap, (self.now + max(0.0, delay), next(self._seq), waiter))
        if self._driver is None or self._driver.done():
            self._driver = loop.create_task(self._drive())
        await waiter

    async def _drive(self) -> None:
        # Wake sleepers one at a time, earliest first, after letting every runnable task run, so
        # virtual time only moves when everybody is waiting (all I/O here is mocked, in-memory).
        while self._heap:
            for _ in range(_SETTLE_YIELDS):
                await asyncio.sleep(0)
            if not self._heap:
                break
            target, _, waiter = heapq.heappop(self._heap)
            if waiter.done():
                continue
            self.now = max(self.now, target)
            waiter.set_result(None)


@dataclass
class Seen:
    """One request as the fake server saw it."""

    at: float
    url: URL
    params: list[tuple[str, str]]
    headers: dict[str, str]
    kwargs: dict[str, object]


Reply = CallbackResult | BaseException


@dataclass
class FakeServer:
    """Answers from a script (FIFO, or per org set via `routes`) and records every request."""

    clock: FakeClock
    script: deque[Reply] = field(default_factory=deque)
    routes: dict[str, deque[Reply]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def callback(self, url: URL, **kwargs: object) -> CallbackResult:
        params = kwargs.get("params")
        assert isinstance(params, list)
        headers = kwargs.get("headers")
        assert isinstance(headers, dict)
        self.seen.append(Seen(self.clock.now, url, list(params), dict(headers), dict(kwargs)))
        queue = self.script
        for org_id, route in self.routes.items():
            if ("org_ids", org_id) in params:
                queue = route
        reply = queue.popleft() if queue else ok()
        if isinstance(reply, BaseException):
            raise reply
        return reply


class _FinishedUpload:
    output_size = 0


class MockResponse(aiohttp.ClientResponse):
    """Works around aioresponses 0.7.9 vs aiohttp 3.14 (pnuckowski/aioresponses#289).

    aiohttp 3.14 added a required `stream_writer` argument to ClientResponse; aioresponses does
    not pass it. With writer=None aiohttp only reads `stream_writer.output_size`, so a stub does.
    """

    def __init__(self, method: str, url: URL, **kwargs: object) -> None:
        kwargs.setdefault("stream_writer", _FinishedUpload())
        super().__init__(method, url, **kwargs)  # type: ignore[arg-type]


def ok(payload: dict[str, object] | None = None) -> CallbackResult:
    return CallbackResult(status=200, payload=GOOD if payload is None else payload, response_class=MockResponse)


def reply(
    status: int, body: str = "", headers: dict[str, str] | None = None, content_type: str = "text/plain"
) -> CallbackResult:
    return CallbackResult(
        status=status, body=body, headers=headers, content_type=content_type, response_class=MockResponse
    )


def reply_json(status: int, payload: Mapping[str, object]) -> CallbackResult:
    return CallbackResult(status=status, payload=dict(payload), response_class=MockResponse)


def settings(**overrides: object) -> ApiSettings:
    values: dict[str, object] = {
        "base_url": BASE,
        "api_key": ApiKey(KEY),
        "timeout": 30.0,
        "max_concurrency": 4,
        "max_requests_per_second": 1000.0,  # effectively off unless a test is about it
        "retries": 3,
    }
    values.update(overrides)
    return ApiSettings(**values)  # type: ignore[arg-type]


def query(org_set: str = "enterprise", **overrides: object) -> UsageQuery:
    values: dict[str, object] = {"org_set": org_set, "start": START, "end": END}
    values.update(overrides)
    return UsageQuery(**values)  # type: ignore[arg-type]


@dataclass
class Harness:
    clock: FakeClock
    server: FakeServer
    mock: aioresponses
    session: aiohttp.ClientSession
    attempts: list[Attempt]

    def client(self, random: Callable[[], float] = lambda: 0.5, **overrides: object) -> UsageClient:
        return UsageClient(
            self.session,
            settings(**overrides),
            monotonic=self.clock.monotonic,
            wall_clock=self.clock.wall,
            sleep=self.clock.sleep,
            random=random,
            observer=self.attempts.append,
        )

    def script(self, *replies: Reply) -> None:
        self.server.script.extend(replies)


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    clock = FakeClock()
    server = FakeServer(clock)
    session = new_session()
    try:
        with aioresponses() as mock:
            mock.get(ANY_USAGE_URL, callback=server.callback, repeat=True)
            yield Harness(clock, server, mock, session, [])
    finally:
        await session.close()


async def fetch_error(client: UsageClient, q: UsageQuery | None = None) -> ApiError:
    with pytest.raises(ApiError) as caught:
        await client.fetch(q or query())
    return caught.value


def sequence(*values: float) -> Callable[[], float]:
    it = iter(values)
    return lambda: next(it)


# --------------------------------------------------------------------------------------------
# Request shape


async def test_request_has_url_bearer_user_agent_accept_and_rfc3339_z_dates(h: Harness) -> None:
    assert await h.client().fetch(query()) == GOOD
    (req,) = h.server.seen
    assert str(req.url.with_query(None)) == ENDPOINT
    assert req.headers["Authorization"] == f"Bearer {KEY}"
    assert req.headers["User-Agent"] == USER_AGENT
    assert USER_AGENT.startswith("devin-usage-exporter/")
    assert req.headers["Accept"] == "application/json"
    assert req.params == [("start_date", "2026-11-23T18:00:00Z"), ("end_date", "2026-11-24T18:00:00Z")]
    assert req.url.query["start_date"] == "2026-11-23T18:00:00Z"


async def test_org_ids_and_user_ids_are_repeated_keys_in_order(h: Harness) -> None:
    await h.client().fetch(query(org_ids=("org-456", "org-123"), user_ids=("user-2", "user-1")))
    (req,) = h.server.seen
    assert req.params == [
        ("start_date", "2026-11-23T18:00:00Z"),
        ("end_date", "2026-11-24T18:00:00Z"),
        ("org_ids", "org-456"),
        ("org_ids", "org-123"),
        ("user_ids", "user-2"),
        ("user_ids", "user-1"),
    ]
    assert req.url.query.getall("org_ids") == ["org-123", "org-456"]  # aioresponses sorts; both sent
    assert req.url.query.getall("user_ids") == ["user-1", "user-2"]


async def test_billing_cycle_sends_no_dates_and_empty_filters_are_omitted(h: Harness) -> None:
    await h.client().fetch(UsageQuery("enterprise", None, None))
    (req,) = h.server.seen
    assert req.params == []
    assert str(req.url) == ENDPOINT


async def test_base_url_trailing_slash_does_not_double_the_path_separator(h: Harness) -> None:
    await h.client(base_url=BASE + "/").fetch(query())
    assert str(h.server.seen[0].url.with_query(None)) == ENDPOINT


async def test_non_utc_aware_datetimes_are_sent_in_utc(h: Harness) -> None:
    pacific = timezone(timedelta(hours=-8))
    await h.client().fetch(query(start=datetime(2026, 11, 24, 0, 0, 0, 999_999, tzinfo=pacific), end=None))
    assert h.server.seen[0].params == [("start_date", "2026-11-24T08:00:00Z")]


async def test_each_attempt_has_its_own_total_timeout_and_redirects_are_not_followed(h: Harness) -> None:
    await h.client(timeout=7.5).fetch(query())
    kwargs = h.server.seen[0].kwargs
    timeout = kwargs["timeout"]
    assert isinstance(timeout, aiohttp.ClientTimeout)
    assert timeout.total == 7.5
    assert kwargs["allow_redirects"] is False


def test_format_rfc3339_is_utc_z_whole_seconds_and_rejects_naive() -> None:
    assert format_rfc3339(datetime(2026, 11, 24, 18, 0, 0, 123_456, tzinfo=UTC)) == "2026-11-24T18:00:00Z"
    plus_two = timezone(timedelta(hours=2))
    assert format_rfc3339(datetime(2026, 1, 1, 1, 30, 5, tzinfo=plus_two)) == "2025-12-31T23:30:05Z"
    with pytest.raises(ValueError):
        format_rfc3339(datetime(2026, 11, 24, 18, 0, 0))


async def test_new_session_has_no_cookie_jar_and_a_bounded_connector() -> None:
    session = new_session()
    try:
        assert isinstance(session.cookie_jar, aiohttp.DummyCookieJar)
        assert isinstance(session.connector, aiohttp.TCPConnector)
        assert 0 < session.connector.limit <= 100
    finally:
        await session.close()


# --------------------------------------------------------------------------------------------
# Successful replies and invalid_response


async def test_success_returns_five_integer_counts(h: Harness) -> None:
    result = await h.client().fetch(query())
    assert result == GOOD
    assert all(type(v) is int for v in result.values())
    assert h.attempts == [Attempt("enterprise", 200, None, 0.0)]


async def test_extra_numeric_fields_are_passed_through_and_other_extras_ignored(h: Harness) -> None:
    payload: dict[str, object] = {
        **GOOD,
        "acu_used": 12.5,
        "playbooks_count": 7,
        "zero": 0,
        "flag": True,
        "label": "x",
        "negative": -1,
        "nested": {"a": 1},
        "huge": 2**60,
        "bad name!": 3,
    }
    h.script(ok(payload))
    result = await h.client().fetch(query())
    assert result == {**GOOD, "acu_used": 12.5, "playbooks_count": 7, "zero": 0}


async def test_non_finite_extra_fields_are_ignored(h: Harness) -> None:
    body = '{"sessions_count":1,"searches_count":2,"prs_opened":3,"prs_closed":4,"prs_merged":5,"a":NaN,"b":Infinity}'
    h.script(reply(200, body, content_type="application/json"))
    assert await h.client().fetch(query()) == {
        "sessions_count": 1, "searches_count": 2, "prs_opened": 3, "prs_closed": 4, "prs_merged": 5}


async def test_count_of_exactly_2_to_the_53_is_accepted(h: Harness) -> None:
    h.script(ok({**GOOD, "sessions_count": 2**53}))
    assert (await h.client().fetch(query()))["sessions_count"] == 2**53


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("<html><body>Bad gateway page</body></html>", "not JSON"),
        ("", "not JSON"),
        ("[1, 2, 3]", "not an object"),
        ('"just a string"', "not an object"),
        ('{"sessions_count":1,"searches_count":2,"prs_opened":3,"prs_closed":4}', "'prs_merged' is missing"),
        ('{"sessions_count":true,"searches_count":2,"prs_opened":3,"prs_closed":4,"prs_merged":5}', "not an integer"),
        ('{"sessions_count":-1,"searches_count":2,"prs_opened":3,"prs_closed":4,"prs_merged":5}', "negative"),
        ('{"sessions_count":1.5,"searches_count":2,"prs_opened":3,"prs_closed":4,"prs_merged":5}', "not an integer"),
        ('{"sessions_count":1.0,"searches_count":2,"prs_opened":3,"prs_closed":4,"prs_merged":5}', "not an integer"),
        ('{"sessions_count":"12","searches_count":2,"prs_opened":3,"prs_closed":4,"prs_merged":5}', "not an integer"),
        ('{"sessions_count":null,"searches_count":2,"prs_opened":3,"prs_closed":4,"prs_merged":5}', "not an integer"),
        ('{"sessions_count":[1],"searches_count":2,"prs_opened":3,"prs_closed":4,"prs_merged":5}', "not an integer"),
        (f'{{"sessions_count":{2**53 + 1},"searches_count":2,"prs_opened":3,"prs_closed":4,"prs_merged":5}}', "2**53"),
    ],
    ids=["html", "empty", "array", "string", "missing", "bool", "negative", "float", "float-whole", "numeric-string",
         "null", "list", "above-2**53"],
)
async def test_malformed_2xx_is_invalid_response_and_not_retried(h: Harness, body: str, why: str) -> None:
    h.script(reply(200, body, content_type="application/json"))
    error = await fetch_error(h.client())
    assert error.reason is ErrorReason.INVALID_RESPONSE
    assert error.status == 200
    assert why in error.message
    assert len(h.server.seen) == 1
    assert h.clock.sleeps == []
    assert h.attempts == [Attempt("enterprise", 200, ErrorReason.INVALID_RESPONSE, 0.0)]


async def test_oversized_2xx_body_is_invalid_response(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    # A small limit keeps aioresponses' in-memory stream below its flow-control watermark.
    monkeypatch.setattr(client_module, "MAX_BODY_BYTES", 1000)
    h.script(reply(200, "[" + "1," * 1000 + "1]", content_type="application/json"))
    error = await fetch_error(h.client())
    assert error.reason is ErrorReason.INVALID_RESPONSE
    assert "body over" in error.message


# --------------------------------------------------------------------------------------------
# Non-retried error classes


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (401, ErrorReason.AUTH),
        (403, ErrorReason.AUTH),
        (422, ErrorReason.CLIENT_ERROR),
        (400, ErrorReason.CLIENT_ERROR),
        (404, ErrorReason.CLIENT_ERROR),
        (301, ErrorReason.CLIENT_ERROR),
        (302, ErrorReason.CLIENT_ERROR),
        (307, ErrorReason.CLIENT_ERROR),
    ],
)
async def test_auth_and_client_errors_are_classified_and_sent_only_once(
    h: Harness, status: int, reason: ErrorReason
) -> None:
    h.script(reply(status, headers={"Location": "https://elsewhere.example/steal"}))
    error = await fetch_error(h.client(retries=5))
    assert error.reason is reason
    assert error.status == status
    assert f"HTTP {status}" in error.message
    assert len(h.server.seen) == 1
    assert h.clock.sleeps == []
    assert h.attempts == [Attempt("enterprise", status, reason, 0.0)]


async def test_redirect_is_reported_not_followed(h: Harness) -> None:
    h.script(reply(302, headers={"Location": "https://elsewhere.example/login"}))
    error = await fetch_error(h.client())
    assert "not followed" in error.message and "elsewhere.example" in error.message
    assert [str(s.url.with_query(None)) for s in h.server.seen] == [ENDPOINT]


async def test_422_message_names_the_validation_detail_messages(h: Harness) -> None:
    detail = {
        "detail": [
            {"loc": ["query", "start_date"], "msg": "Input should be a valid datetime", "type": "datetime_parsing"},
            {"loc": ["query", "end_date"], "msg": "Input should be a valid datetime", "type": "datetime_parsing"},
        ]
    }
    h.script(reply_json(422, detail))
    error = await fetch_error(h.client())
    assert error.reason is ErrorReason.CLIENT_ERROR
    assert "HTTP 422" in error.message
    assert "start_date: Input should be a valid datetime" in error.message
    assert "end_date: Input should be a valid datetime" in error.message


async def test_html_error_body_appears_as_a_short_tag_free_snippet(h: Harness) -> None:
    page = ("<html><head><title>502 Bad Gateway</title></head><body><h1>Bad   Gateway</h1>"
            + "x" * 5000 + "</body></html>")
    h.script(reply(502, page, content_type="text/html"))
    error = await fetch_error(h.client(retries=0))
    assert error.reason is ErrorReason.SERVER_ERROR
    assert "HTTP 502" in error.message
    assert "502 Bad Gateway Bad Gateway" in error.message
    assert "<" not in error.message
    assert len(error.message) < 400


async def test_key_with_a_newline_is_an_auth_error_without_sending(h: Harness) -> None:
    error = await fetch_error(h.client(api_key=ApiKey(KEY + "\n")))
    assert error.reason is ErrorReason.AUTH
    assert h.server.seen == []
    assert KEY not in str(error)


# --------------------------------------------------------------------------------------------
# Retries and backoff


@pytest.mark.parametrize(
    ("failure", "reason", "status"),
    [
        (reply(429), ErrorReason.RATE_LIMITED, 429),
        (reply(500), ErrorReason.SERVER_ERROR, 500),
        (reply(503), ErrorReason.SERVER_ERROR, 503),
        (TimeoutError(), ErrorReason.TIMEOUT, None),
        (aiohttp.ServerTimeoutError("read timed out"), ErrorReason.TIMEOUT, None),
        (aiohttp.ClientConnectionError("Connection refused"), ErrorReason.CONNECTION, None),
        (aiohttp.ServerDisconnectedError(), ErrorReason.CONNECTION, None),
        (aiohttp.ClientPayloadError("Response payload is not completed"), ErrorReason.CONNECTION, None),
    ],
    ids=["429", "500", "503", "timeout", "server-timeout", "refused", "disconnected", "payload"],
)
async def test_transient_failures_are_retried_with_full_jitter_exponential_backoff(
    h: Harness, failure: Reply, reason: ErrorReason, status: int | None
) -> None:
    h.script(failure, failure, failure, ok())
    assert await h.client(retries=3, random=lambda: 0.5).fetch(query()) == GOOD
    # uniform(0, min(60, 1 * 2**(n-1))) with random() = 0.5
    assert h.clock.sleeps == [0.5, 1.0, 2.0]
    assert len(h.server.seen) == 4
    assert [s.at - h.server.seen[0].at for s in h.server.seen] == [0.0, 0.5, 1.5, 3.5]
    assert [(a.status, a.reason) for a in h.attempts] == [(status, reason)] * 3 + [(200, None)]


async def test_exhausted_retries_raise_the_last_reason(h: Harness) -> None:
    h.script(reply(503), reply(500), aiohttp.ClientConnectionError("reset"))
    error = await fetch_error(h.client(retries=2))
    assert error.reason is ErrorReason.CONNECTION
    assert error.status is None
    assert len(h.server.seen) == 3
    assert h.clock.sleeps == [0.5, 1.0]


async def test_retries_zero_means_a_single_attempt(h: Harness) -> None:
    h.script(reply(500))
    error = await fetch_error(h.client(retries=0))
    assert error.reason is ErrorReason.SERVER_ERROR
    assert len(h.server.seen) == 1
    assert h.clock.sleeps == []


async def test_backoff_ceiling_doubles_from_one_second_and_caps_at_sixty(h: Harness) -> None:
    almost_one = 1.0 - 2**-20
    h.script(*[reply(500)] * 9)
    await fetch_error(h.client(retries=8, random=lambda: almost_one))
    assert h.clock.sleeps == pytest.approx([1, 2, 4, 8, 16, 32, 60, 60], rel=1e-5)
    assert all(s < c for s, c in zip(h.clock.sleeps, [1, 2, 4, 8, 16, 32, 60, 60], strict=False))


async def test_jitter_draws_each_delay_from_random(h: Harness) -> None:
    h.script(reply(500), reply(500), reply(500), ok())
    await h.client(random=sequence(0.1, 0.9, 0.25)).fetch(query())
    assert h.clock.sleeps == pytest.approx([0.1, 1.8, 1.0])


# --------------------------------------------------------------------------------------------
# Retry-After


def test_parse_retry_after_accepts_seconds_and_http_dates_and_rejects_garbage() -> None:
    now = WALL_START
    assert parse_retry_after("30", now) == 30.0
    assert parse_retry_after(" 2 ", now) == 2.0
    assert parse_retry_after("0", now) == 0.0
    date = format_datetime(datetime.fromtimestamp(now + 45, UTC), usegmt=True)
    assert parse_retry_after(date, now) == 45.0
    past = format_datetime(datetime.fromtimestamp(now - 45, UTC), usegmt=True)
    assert parse_retry_after(past, now) == 0.0
    assert parse_retry_after("999999", now) == RETRY_AFTER_CAP
    for garbage in ("-5", "", "soon", "nan", "inf", "Wed, 99 Foo 2026 25:61:00 GMT"):
        assert parse_retry_after(garbage, now) is None, garbage


async def test_retry_after_seconds_sets_the_wait_when_longer_than_backoff(h: Harness) -> None:
    h.script(reply(429, headers={"Retry-After": "7"}), ok())
    assert await h.client().fetch(query()) == GOOD
    assert h.clock.sleeps == [7.0]
    first, second = h.server.seen
    assert second.at - first.at == 7.0


async def test_retry_after_shorter_than_backoff_does_not_shorten_it(h: Harness) -> None:
    h.script(reply(503, headers={"Retry-After": "0"}), ok())
    await h.client(random=lambda: 0.75).fetch(query())
    assert h.clock.sleeps == [0.75]


async def test_retry_after_http_date_is_relative_to_the_wall_clock(h: Harness) -> None:
    date = format_datetime(datetime.fromtimestamp(h.clock.wall() + 20, UTC), usegmt=True)
    h.script(reply(429, headers={"Retry-After": date}), ok())
    await h.client().fetch(query())
    assert h.clock.sleeps == [20.0]
    assert h.server.seen[1].at - h.server.seen[0].at == 20.0


async def test_garbage_retry_after_falls_back_to_plain_backoff(h: Harness) -> None:
    h.script(reply(429, headers={"Retry-After": "later, please"}), ok())
    client = h.client(random=lambda: 0.5)
    await client.fetch(query())
    assert h.clock.sleeps == [0.5]
    assert client.paused_until is None


async def test_retry_after_on_exhaustion_is_on_the_error_and_still_pauses_later_fetches(h: Harness) -> None:
    h.script(reply(429, headers={"Retry-After": "12"}), ok())
    client = h.client(retries=0)
    t0 = h.clock.now
    error = await fetch_error(client)
    assert error.reason is ErrorReason.RATE_LIMITED
    assert error.retry_after == 12.0
    assert "Retry-After 12s" in error.message
    assert client.paused_until == t0 + 12.0
    await client.fetch(query())
    assert h.server.seen[1].at == t0 + 12.0
    assert client.paused_until is None


async def test_retry_after_on_a_non_retryable_status_is_ignored(h: Harness) -> None:
    h.script(reply(401, headers={"Retry-After": "30"}))
    client = h.client()
    error = await fetch_error(client)
    assert error.retry_after is None
    assert client.paused_until is None


async def test_retry_after_from_one_caller_pauses_another_concurrent_caller(h: Harness) -> None:
    # Two org sets in flight together; rate limit spaces them so A's 429 lands before B is sent.
    h.server.routes["org-a"] = deque([reply(429, headers={"Retry-After": "30"}), ok()])
    h.server.routes["org-b"] = deque([ok()])
    client = h.client(max_requests_per_second=2.0)
    t0 = h.clock.now
    a = asyncio.create_task(client.fetch(query("a", org_ids=("org-a",))))
    b = asyncio.create_task(client.fetch(query("b", org_ids=("org-b",))))
    assert list(await asyncio.gather(a, b)) == [GOOD, GOOD]
    sent = [(s.params[-1][1], s.at) for s in h.server.seen]
    assert sent[0] == ("org-a", t0)
    (b_sent,) = [at for who, at in sent if who == "org-b"]
    assert b_sent >= t0 + 30.0  # it would have gone at t0 + 0.5 without the shared pause
    (_, a_retry) = [at for who, at in sent if who == "org-a"]
    assert a_retry == t0 + 30.0
    # After the pause both go, still spaced by the rate limit.
    assert sorted([a_retry, b_sent]) == [t0 + 30.0, t0 + 30.5]


# --------------------------------------------------------------------------------------------
# Shared limits


async def test_concurrency_limit_bounds_requests_in_flight(h: Harness) -> None:
    gate = asyncio.Event()
    in_flight = 0
    peak = 0

    async def slow(url: URL, **kwargs: object) -> CallbackResult:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await gate.wait()
        finally:
            in_flight -= 1
        return ok()

    h.mock.clear()
    h.mock.get(ANY_USAGE_URL, callback=slow, repeat=True)
    client = h.client(max_concurrency=2)
    tasks = [asyncio.create_task(client.fetch(query(f"set{i}"))) for i in range(6)]
    try:
        for _ in range(200):
            await asyncio.sleep(0)
        assert in_flight == 2  # the limit is reached and held while the first two hang
    finally:
        gate.set()  # never leave tasks hanging, even when the assertion fails
    assert await asyncio.gather(*tasks) == [GOOD] * 6
    assert peak == 2


async def test_concurrency_slot_handed_to_a_waiter_cancelled_at_that_moment_is_passed_on() -> None:
    limit = client_module._InFlightLimit(1)
    await limit.acquire()
    second = asyncio.create_task(limit.acquire())
    third = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    limit.release()  # hands the slot to `second`...
    second.cancel()  # ...which is cancelled before it gets to run
    with pytest.raises(asyncio.CancelledError):
        await second
    for _ in range(10):
        await asyncio.sleep(0)
    assert third.done()  # the slot moved on instead of leaking
    assert limit.in_flight == 1
    limit.release()
    assert limit.in_flight == 0


async def test_raising_the_concurrency_limit_on_reload_admits_waiters_at_once() -> None:
    limit = client_module._InFlightLimit(1)
    await limit.acquire()
    waiter = asyncio.create_task(limit.acquire())
    await asyncio.sleep(0)
    assert not waiter.done()
    limit.set_limit(2)
    await asyncio.sleep(0)
    assert waiter.done()
    assert limit.in_flight == 2


async def test_cancelled_fetch_releases_its_concurrency_slot(h: Harness) -> None:
    gate = asyncio.Event()

    async def hang_first(url: URL, **kwargs: object) -> CallbackResult:
        if not gate.is_set():
            gate.set()
            await asyncio.Event().wait()  # never answers
        return ok()

    h.mock.clear()
    h.mock.get(ANY_USAGE_URL, callback=hang_first, repeat=True)
    client = h.client(max_concurrency=1)
    stuck = asyncio.create_task(client.fetch(query("stuck")))
    await gate.wait()
    waiting = asyncio.create_task(client.fetch(query("waiting")))
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck
    assert await asyncio.wait_for(waiting, timeout=5) == GOOD


async def test_rate_limit_spaces_request_starts_by_one_over_rps(h: Harness) -> None:
    client = h.client(max_requests_per_second=2.0, max_concurrency=10)
    await asyncio.gather(*(client.fetch(query(f"set{i}")) for i in range(5)))
    starts = sorted(s.at for s in h.server.seen)
    assert len(starts) == 5
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap >= 0.5 for gap in gaps), gaps
    assert starts[-1] - starts[0] == pytest.approx(2.0)  # no slower than needed either


async def test_a_shard_of_four_sends_at_a_quarter_of_max_requests_per_second(h: Harness) -> None:
    # COUNT replicas share one key, whose limit is upstream's: each keeps to 1/COUNT of the rate.
    sharded = parse_config(f"api: {{api_key: {KEY}, max_requests_per_second: 8}}\nshard: 1/4\n"
                           "org_sets: [{name: a}, {name: b}]\n", "sharded.yaml", env={})
    client = h.client(max_requests_per_second=sharded.api.max_requests_per_second, max_concurrency=10,
                      rate_share=sharded.api.rate_share)
    await asyncio.gather(*(client.fetch(query(f"set{i}")) for i in range(5)))
    starts = sorted(s.at for s in h.server.seen)
    assert [b - a for a, b in itertools.pairwise(starts)] == [pytest.approx(0.5)] * 4  # 8/s / 4 replicas = 2/s


async def test_rate_limit_also_spaces_sequential_requests_and_retries(h: Harness) -> None:
    h.script(reply(500), ok())
    client = h.client(max_requests_per_second=0.25, random=lambda: 0.0)  # backoff 0: rate limit decides
    await client.fetch(query())
    await client.fetch(query())
    starts = [s.at for s in h.server.seen]
    assert [b - a for a, b in itertools.pairwise(starts)] == [4.0, 4.0]


async def test_update_settings_applies_new_key_and_limits_to_later_requests(h: Harness) -> None:
    client = h.client(max_requests_per_second=1.0)
    await client.fetch(query())
    client.update_settings(settings(api_key=ApiKey("apk_user_NEW_KEY"), max_requests_per_second=0.5, base_url=BASE))
    await client.fetch(query())
    await client.fetch(query())
    assert [s.headers["Authorization"] for s in h.server.seen] == [
        f"Bearer {KEY}",
        "Bearer apk_user_NEW_KEY",
        "Bearer apk_user_NEW_KEY",
    ]
    starts = [s.at for s in h.server.seen]
    assert starts[2] - starts[1] == 2.0


# --------------------------------------------------------------------------------------------
# Observation and logging


async def test_observer_gets_one_attempt_per_attempt_with_status_reason_and_duration(h: Harness) -> None:
    async def slow_ok(url: URL, **kwargs: object) -> CallbackResult:
        await h.clock.sleep(0.25)  # the fake server takes 0.25 s of virtual time
        return ok()

    h.script(reply(429), TimeoutError())
    h.mock.clear()
    calls = 0

    async def route(url: URL, **kwargs: object) -> CallbackResult:
        nonlocal calls
        calls += 1
        if calls <= 2:
            return h.server.callback(url, **kwargs)
        return await slow_ok(url, **kwargs)

    h.mock.get(ANY_USAGE_URL, callback=route, repeat=True)
    await h.client().fetch(query("platform"))
    assert h.attempts == [
        Attempt("platform", 429, ErrorReason.RATE_LIMITED, 0.0),
        Attempt("platform", None, ErrorReason.TIMEOUT, 0.0),
        Attempt("platform", 200, None, 0.25),
    ]


async def test_a_failing_observer_does_not_fail_the_fetch(h: Harness) -> None:
    def broken(attempt: Attempt) -> None:
        raise RuntimeError("metrics bug")

    client = UsageClient(h.session, settings(), monotonic=h.clock.monotonic, sleep=h.clock.sleep, observer=broken)
    assert await client.fetch(query()) == GOOD


async def test_each_attempt_is_logged_at_debug_with_org_set_status_and_reason(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="exporter.transport")
    h.script(reply(500), ok())
    await h.client().fetch(query("platform"))
    attempts = [r for r in caplog.records if r.getMessage() == "usage API attempt"]
    assert [(r.__dict__["org_set"], r.__dict__["status"], r.__dict__["reason"]) for r in attempts] == [
        ("platform", 500, "server_error"),
        ("platform", 200, None),
    ]
    assert all(r.levelno == logging.DEBUG for r in attempts)


# --------------------------------------------------------------------------------------------
# The key never leaks


def _header_carrying_error() -> aiohttp.ClientResponseError:
    # aiohttp errors carry request_info, whose headers include our Authorization header.
    info = aiohttp.RequestInfo(
        URL(ENDPOINT), "GET", CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {KEY}"})), URL(ENDPOINT)
    )
    return aiohttp.ClientResponseError(info, (), status=0, message=f"echo Bearer {KEY}")


LEAKY_FAILURES: Final[list[Callable[[], Reply]]] = [
    lambda: reply(401, f"bad token {KEY}"),
    lambda: reply(403, '{"detail": "forbidden"}', content_type="application/json"),
    lambda: reply_json(422, {"detail": [{"loc": ["header", "authorization"], "msg": f"bad {KEY}", "type": "x"}]}),
    lambda: reply(302, headers={"Location": f"https://evil.example/?k={KEY}"}),
    lambda: reply(429, headers={"Retry-After": "1"}),
    lambda: reply(500, f"<pre>Authorization: Bearer {KEY}</pre>", content_type="text/html"),
    lambda: reply(200, f"not json {KEY}", content_type="application/json"),
    lambda: TimeoutError(),
    lambda: aiohttp.ServerTimeoutError(f"timeout {KEY}"),
    lambda: aiohttp.ClientConnectionError(f"refused Bearer {KEY}"),
    # The key straddles the 200-character cut of exception text: scrubbed before it is cut.
    lambda: aiohttp.ClientConnectionError("x" * 180 + KEY),
    lambda: aiohttp.ServerDisconnectedError(),
    _header_carrying_error,
]


@pytest.mark.parametrize(
    "make_failure",
    LEAKY_FAILURES,
    ids=["401-echo", "403", "422-echo", "302-echo", "429", "500-echo", "invalid-echo", "timeout",
         "server-timeout-echo", "refused-echo", "cut-key-echo", "disconnected", "request-info-headers"],
)
async def test_api_key_never_appears_in_errors_logs_or_tracebacks(
    h: Harness, caplog: pytest.LogCaptureFixture, make_failure: Callable[[], Reply]
) -> None:
    caplog.set_level(logging.DEBUG)
    h.script(*(make_failure() for _ in range(3)))
    client = h.client(retries=2)
    error = await fetch_error(client)
    texts: list[str] = [str(error), repr(error), *map(str, error.args), error.message, repr(client)]
    texts.append("".join(traceback.format_exception(error)))
    texts.extend(r.getMessage() for r in caplog.records)
    texts.extend(repr(vars(r)) for r in caplog.records)
    texts.append(caplog.text)
    texts.append(repr(pickle.loads(pickle.dumps(error))))
    for text in texts:
        assert KEY not in text
        assert KEY[len("apk_user_"):][:8] not in text  # nor a key cut short by truncation
    assert error.__cause__ is None
    assert error.__context__ is None
    assert error.__suppress_context__ is True
    assert [a.status for a in h.attempts]  # every path was actually exercised
    assert h.server.seen  # ...and a request carrying the key really was sent
    assert h.server.seen[0].headers["Authorization"] == f"Bearer {KEY}"


def test_api_error_pickles_with_its_fields() -> None:
    error = ApiError(ErrorReason.RATE_LIMITED, "HTTP 429", status=429, retry_after=3.0)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.status, copy.message, copy.retry_after) == (
        ErrorReason.RATE_LIMITED, 429, "HTTP 429", 3.0)


def test_error_reason_values_are_the_metric_label_values() -> None:
    assert [r.value for r in ErrorReason] == [
        "rate_limited",
        "server_error",
        "auth",
        "client_error",
        "timeout",
        "connection",
        "invalid_response",
    ]
