"""The API simulator over real loopback sockets: auth, validation, counts, faults and its CLI."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import re
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from aiohttp.typedefs import Handler

from exporter.simulator import (
    DEFAULT_DEMO_KEY,
    ENTERPRISE_ORG_IDS,
    FAULTS_KEY,
    MALFORMED_KINDS,
    REQUESTS_KEY,
    USAGE_FIELDS,
    USAGE_PATH,
    Faults,
    billing_cycle,
    create_app,
    expected_usage,
    main,
    parse_datetime,
    start_simulator,
)

NOW = datetime(2026, 11, 24, 18, 7, 30, tzinfo=UTC)
AUTH = {"Authorization": f"Bearer {DEFAULT_DEMO_KEY}"}
REPO_ROOT = Path(__file__).resolve().parents[1]

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]


class FakeClock:
    """A settable clock, so counts and the rate limiter are tested without sleeping."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def window(
    start: datetime | None,
    end: datetime | None,
    org_ids: Sequence[str] = (),
    user_ids: Sequence[str] = (),
) -> list[tuple[str, str]]:
    """Query params the way the exporter sends them: arrays as repeated keys."""
    params: list[tuple[str, str]] = []
    if start is not None:
        params.append(("start_date", rfc3339(start)))
    if end is not None:
        params.append(("end_date", rfc3339(end)))
    params += [("org_ids", o) for o in org_ids]
    params += [("user_ids", u) for u in user_ids]
    return params


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def faults() -> Faults:
    return Faults()


@pytest.fixture
def app(clock: FakeClock, faults: Faults) -> web.Application:
    return create_app(faults=faults, clock=clock)


@pytest.fixture
async def client(aiohttp_client: MakeClient, app: web.Application) -> Client:
    return await aiohttp_client(app)


async def get_usage(
    client: Client, params: Sequence[tuple[str, str]] = (), headers: Mapping[str, str] = AUTH
) -> tuple[int, object]:
    async with client.get(USAGE_PATH, params=list(params), headers=dict(headers)) as resp:
        return resp.status, await resp.json()


async def counts(client: Client, params: Sequence[tuple[str, str]]) -> dict[str, int]:
    status, body = await get_usage(client, params)
    assert status == 200, body
    assert isinstance(body, dict)
    return body


# ---------------------------------------------------------------------------------- auth


async def test_missing_bearer_token_is_401_not_authenticated(client: Client) -> None:
    async with client.get(USAGE_PATH) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == "Bearer"
        assert await resp.json() == {"detail": "Not authenticated"}


async def test_non_bearer_scheme_is_401(client: Client) -> None:
    status, body = await get_usage(client, headers={"Authorization": f"Basic {DEFAULT_DEMO_KEY}"})
    assert (status, body) == (401, {"detail": "Not authenticated"})


async def test_wrong_api_key_is_401_invalid_api_key(client: Client) -> None:
    async with client.get(USAGE_PATH, headers={"Authorization": "Bearer apk_user_wrong"}) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == "Bearer"
        assert await resp.json() == {"detail": "Invalid API key"}


async def test_api_key_none_accepts_any_token_but_still_requires_the_header(
    aiohttp_client: MakeClient, clock: FakeClock
) -> None:
    client = await aiohttp_client(create_app(api_key=None, clock=clock))
    status, _ = await get_usage(client, headers={"Authorization": "Bearer anything-at-all"})
    assert status == 200
    status, _ = await get_usage(client, headers={})
    assert status == 401


# ---------------------------------------------------------------------------- validation


async def test_unparseable_date_is_fastapi_shaped_422(client: Client) -> None:
    params = [("start_date", "not-a-date!"), ("end_date", rfc3339(NOW))]
    status, body = await get_usage(client, params)
    assert status == 422
    assert body == {
        "detail": [
            {
                "type": "datetime_from_date_parsing",
                "loc": ["query", "start_date"],
                "msg": "Input should be a valid datetime or date, invalid character in year",
                "input": "not-a-date!",
                "ctx": {"error": "invalid character in year"},
            }
        ]
    }


async def test_every_bad_date_param_gets_its_own_422_entry_in_declaration_order(
    client: Client,
) -> None:
    status, body = await get_usage(client, [("end_date", "soon"), ("start_date", "2026-13-01")])
    assert status == 422
    assert isinstance(body, dict)
    assert [(e["loc"], e["input"]) for e in body["detail"]] == [
        (["query", "start_date"], "2026-13-01"),
        (["query", "end_date"], "soon"),
    ]


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ("start_date", "end_date"),
        ("end_date", "start_date"),
        ("start", "end_date"),
        ("end", "start_date"),
    ],
)
async def test_one_sided_window_is_422_missing_the_other_bound(
    client: Client, given: str, missing: str
) -> None:
    status, body = await get_usage(client, [(given, rfc3339(NOW))])
    assert status == 422
    assert body == {
        "detail": [
            {"type": "missing", "loc": ["query", missing], "msg": "Field required", "input": None}
        ]
    }


async def test_start_after_end_is_422_value_error(client: Client) -> None:
    start = rfc3339(NOW)
    status, body = await get_usage(
        client, [("start_date", start), ("end_date", rfc3339(NOW - timedelta(hours=1)))]
    )
    assert status == 422
    assert isinstance(body, dict)
    [entry] = body["detail"]
    assert entry["type"] == "value_error"
    assert entry["loc"] == ["query", "start_date"]
    assert entry["input"] == start
    assert entry["msg"].startswith("Value error, ")


# Messages as pydantic 2.13 words them for the same inputs.
@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "input is too short"),
        ("yesterday", "input is too short"),
        ("2026/11/24", "invalid date separator, expected `-`"),
        ("2026-1x-24", "invalid character in month"),
        ("2026-13-01", "month value is outside expected range of 1-12"),
        ("2026-02-30", "day value is outside expected range"),
        ("2026-11-24T25:00:00Z", "unexpected extra characters at the end of the input"),
        ("2026-11-24T18:00:00+02", "unexpected extra characters at the end of the input"),
        ("1e9", "input is too short"),
        ("300000000000000", "dates after 9999 are not supported as unix timestamps"),
    ],
)
def test_unparseable_datetimes_are_rejected_with_pydantic_reason(value: str, reason: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(reason)}$"):
        parse_datetime(value)


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-24T18:00:00Z",
        "2026-11-24t18:00:00z",
        "2026-11-24T18:00:00+00:00",
        "2026-11-24T20:00:00+02:00",
        "2026-11-24T13:00:00-0500",
        "2026-11-24 18:00:00",  # naive means UTC
        "2026-11-24_18:00",
        "2026-11-24T18:00:00.000000Z",
        str(int(datetime(2026, 11, 24, 18, tzinfo=UTC).timestamp())),  # unix seconds
        str(int(datetime(2026, 11, 24, 18, tzinfo=UTC).timestamp()) * 1000),  # unix ms
    ],
)
def test_datetime_spellings_pydantic_accepts_parse_to_the_same_utc_instant(value: str) -> None:
    assert parse_datetime(value) == datetime(2026, 11, 24, 18, tzinfo=UTC)


def test_bare_date_means_midnight_utc() -> None:
    assert parse_datetime("2026-11-24") == datetime(2026, 11, 24, tzinfo=UTC)


async def test_offset_datetimes_count_the_same_as_their_utc_equivalent(client: Client) -> None:
    utc = await counts(
        client, [("start_date", "2026-11-24T10:00:00Z"), ("end_date", "2026-11-24T16:00:00Z")]
    )
    offset = await counts(
        client,
        [("start_date", "2026-11-24T12:00:00+02:00"), ("end_date", "2026-11-24T08:00:00-08:00")],
    )
    assert offset == utc


async def test_start_and_end_aliases_mean_the_same_as_start_date_and_end_date(
    client: Client,
) -> None:
    start, end = rfc3339(NOW - timedelta(hours=3)), rfc3339(NOW)
    aliased = await counts(client, [("start", start), ("end", end)])
    assert aliased == await counts(client, [("start_date", start), ("end_date", end)])


async def test_documented_names_win_over_aliases(client: Client) -> None:
    end = rfc3339(NOW)
    both = await counts(
        client,
        [
            ("start_date", rfc3339(NOW - timedelta(hours=1))),
            ("start", rfc3339(NOW - timedelta(days=1))),
            ("end_date", end),
        ],
    )
    assert both == expected_usage([], [], NOW - timedelta(hours=1), NOW, now=NOW)


async def test_unknown_path_is_fastapi_json_404(client: Client) -> None:
    async with client.get("/v2/enterprise/metrics/nope", headers=AUTH) as resp:
        assert resp.status == 404
        assert await resp.json() == {"detail": "Not Found"}


# -------------------------------------------------------------------------------- counts


async def test_repeated_org_ids_filter_and_match_expected_usage(client: Client) -> None:
    start = NOW - timedelta(hours=24)
    both = await counts(client, window(start, NOW, org_ids=["org-123", "org-456"]))
    one = await counts(client, window(start, NOW, org_ids=["org-123"]))
    other = await counts(client, window(start, NOW, org_ids=["org-789"]))
    assert both == expected_usage(["org-123", "org-456"], [], start, NOW, now=NOW)
    assert one == expected_usage(["org-123"], [], start, NOW, now=NOW)
    assert other == expected_usage(["org-789"], [], start, NOW, now=NOW)
    assert len({tuple(both.values()), tuple(one.values()), tuple(other.values())}) == 3
    assert all(both[f] >= one[f] for f in USAGE_FIELDS)


async def test_no_org_ids_means_the_whole_enterprise(client: Client) -> None:
    start = NOW - timedelta(hours=6)
    enterprise = await counts(client, window(start, NOW))
    per_org = [expected_usage([o], [], start, NOW, now=NOW) for o in ENTERPRISE_ORG_IDS]
    assert enterprise == {f: sum(c[f] for c in per_org) for f in USAGE_FIELDS}


async def test_user_ids_filter_scales_counts_down(client: Client) -> None:
    start = NOW - timedelta(days=7)
    everyone = await counts(client, window(start, NOW, org_ids=["org-123"]))
    two = await counts(
        client, window(start, NOW, org_ids=["org-123"], user_ids=["user-1", "user-2"])
    )
    assert two == expected_usage(["org-123"], ["user-2", "user-1"], start, NOW, now=NOW)
    assert 0 < two["sessions_count"] < everyone["sessions_count"]


async def test_same_query_gives_the_same_body_even_from_another_app(
    client: Client, aiohttp_client: MakeClient, clock: FakeClock
) -> None:
    params = window(NOW - timedelta(hours=5), NOW, org_ids=["org-x"])
    first = await counts(client, params)
    assert await counts(client, params) == first
    other = await aiohttp_client(create_app(clock=clock, seed=99))
    assert await counts(other, params) == first


async def test_longer_window_never_has_smaller_counts(client: Client) -> None:
    results = [
        await counts(client, window(NOW - span, NOW))
        for span in (timedelta(hours=1), timedelta(hours=24), timedelta(days=7), timedelta(days=30))
    ]
    for shorter, longer in itertools.pairwise(results):
        assert all(longer[f] >= shorter[f] for f in USAGE_FIELDS), (shorter, longer)
    assert results[-1]["sessions_count"] > results[0]["sessions_count"]


async def test_later_end_never_has_smaller_counts(client: Client) -> None:
    start = NOW - timedelta(days=2)
    earlier = await counts(client, window(start, NOW - timedelta(hours=12)))
    later = await counts(client, window(start, NOW))
    assert all(later[f] >= earlier[f] for f in USAGE_FIELDS)
    assert later["sessions_count"] > earlier["sessions_count"]


async def test_one_hour_of_a_typical_org_is_not_zero(client: Client) -> None:
    for org in ENTERPRISE_ORG_IDS:
        hour = await counts(client, window(NOW - timedelta(hours=1), NOW, org_ids=[org]))
        assert hour["sessions_count"] > 0
        assert hour["searches_count"] > 0
        assert hour["prs_opened"] > 0


async def test_no_dates_means_the_billing_cycle_so_far(client: Client, clock: FakeClock) -> None:
    body = await counts(client, [])
    cycle_start = datetime(2026, 11, 5, 8, tzinfo=UTC)  # cycles start on the 5th, 08:00 UTC
    assert body == expected_usage([], [], cycle_start, NOW, now=NOW)
    clock.advance(3600)
    grown = await counts(client, [])
    assert grown["sessions_count"] > body["sessions_count"]


async def test_end_in_the_future_counts_only_up_to_now(client: Client) -> None:
    start = NOW - timedelta(hours=2)
    future = await counts(client, window(start, NOW + timedelta(days=1)))
    assert future == await counts(client, window(start, NOW))


def test_pr_counts_never_exceed_their_parent_count_for_any_window() -> None:
    rng = random.Random(0)
    for _ in range(300):
        org = f"org-{rng.randrange(10**6)}"
        users = [f"user-{rng.randrange(50)}" for _ in range(rng.randrange(3))]
        end = NOW - timedelta(hours=rng.uniform(0, 2000))
        start = end - timedelta(hours=rng.uniform(0, 200))
        c = expected_usage([org], users, start, end, now=NOW)
        assert 0 <= c["prs_merged"] <= c["prs_closed"] <= c["prs_opened"] <= c["sessions_count"], c


def test_searches_outnumber_sessions_over_a_day() -> None:
    for org in [*ENTERPRISE_ORG_IDS, "org-x", "org-y"]:
        day = expected_usage([org], [], NOW - timedelta(days=1), NOW, now=NOW)
        assert day["searches_count"] > day["sessions_count"], (org, day)


def test_adjacent_windows_add_up() -> None:
    a, b, c = NOW - timedelta(days=3), NOW - timedelta(hours=7, minutes=13), NOW
    whole = expected_usage(["org-1"], [], a, c, now=NOW)
    left, right = (
        expected_usage(["org-1"], [], a, b, now=NOW),
        expected_usage(["org-1"], [], b, c, now=NOW),
    )
    assert whole == {f: left[f] + right[f] for f in USAGE_FIELDS}


def test_expected_usage_rejects_start_after_end() -> None:
    with pytest.raises(ValueError, match="start must not be after end"):
        expected_usage([], [], NOW, NOW - timedelta(seconds=1), now=NOW)


def test_naive_datetimes_are_utc() -> None:
    naive = NOW.replace(tzinfo=None)
    assert expected_usage([], [], naive - timedelta(hours=3), naive, now=naive) == expected_usage(
        [], [], NOW - timedelta(hours=3), NOW, now=NOW
    )


# ---------------------------------------------------------------------- billing calendar


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


@pytest.mark.parametrize(
    ("instant", "start", "end"),
    [
        (NOW, utc(2026, 11, 5, 8), utc(2026, 12, 5, 8)),
        (utc(2026, 11, 5, 8), utc(2026, 11, 5, 8), utc(2026, 12, 5, 8)),
        (utc(2026, 11, 5, 7, 59, 59), utc(2026, 10, 5, 8), utc(2026, 11, 5, 8)),
        (utc(2026, 12, 31, 23), utc(2026, 12, 5, 8), utc(2027, 1, 5, 8)),
        (utc(2027, 1, 2), utc(2026, 12, 5, 8), utc(2027, 1, 5, 8)),
        # Fixed 08:00 UTC all year: no shift for Pacific daylight time.
        (utc(2026, 7, 5, 7, 30), utc(2026, 6, 5, 8), utc(2026, 7, 5, 8)),
    ],
)
def test_billing_cycles_run_from_the_5th_at_0800_utc(instant: datetime, start: datetime, end: datetime) -> None:
    assert billing_cycle(instant) == (start, end)


# -------------------------------------------------------------------------------- faults


async def test_latency_fault_delays_every_response(client: Client, faults: Faults) -> None:
    faults.latency = 0.2
    began = time.monotonic()
    status, _ = await get_usage(client, window(NOW - timedelta(hours=1), NOW))
    assert status == 200
    assert time.monotonic() - began >= 0.2


async def test_error_rate_one_answers_500_html(client: Client, faults: Faults) -> None:
    faults.error_rate = 1.0
    async with client.get(USAGE_PATH, headers=AUTH) as resp:
        assert resp.status == 500
        assert resp.content_type == "text/html"
        assert await resp.text() == "<html><body><h1>500 Internal Server Error</h1></body></html>"


async def test_error_rate_is_reproducible_for_a_seed(
    aiohttp_client: MakeClient, clock: FakeClock
) -> None:
    async def statuses(seed: int) -> list[int]:
        client = await aiohttp_client(
            create_app(clock=clock, seed=seed, faults=Faults(error_rate=0.5))
        )
        result = []
        for _ in range(24):
            async with client.get(USAGE_PATH, headers=AUTH) as resp:
                result.append(resp.status)
        return result

    first = await statuses(seed=1)
    assert set(first) == {200, 500}
    assert await statuses(seed=1) == first
    assert await statuses(seed=2) != first


async def test_status_429_fault_sends_json_detail_and_retry_after(
    client: Client, faults: Faults
) -> None:
    faults.status = 429
    async with client.get(USAGE_PATH, headers=AUTH) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "1"
        assert await resp.json() == {"detail": "Too Many Requests"}
    faults.retry_after = "Wed, 25 Nov 2026 18:00:00 GMT"
    async with client.get(USAGE_PATH, headers=AUTH) as resp:
        assert resp.headers["Retry-After"] == "Wed, 25 Nov 2026 18:00:00 GMT"
    faults.retry_after = None
    async with client.get(USAGE_PATH, headers=AUTH) as resp:
        assert resp.status == 429
        assert "Retry-After" not in resp.headers


@pytest.mark.parametrize(("status", "phrase"), [(502, "Bad Gateway"), (503, "Service Unavailable")])
async def test_status_5xx_fault_answers_a_gateway_html_page(
    client: Client, faults: Faults, status: int, phrase: str
) -> None:
    faults.status = status
    async with client.get(USAGE_PATH, headers=AUTH) as resp:
        assert resp.status == status
        assert resp.content_type == "text/html"
        assert await resp.text() == f"<html><body><h1>{status} {phrase}</h1></body></html>"


@pytest.mark.parametrize("status", [401, 403])
async def test_status_auth_fault_answers_json_detail_even_with_the_right_key(
    client: Client, faults: Faults, status: int
) -> None:
    faults.status = status
    code, body = await get_usage(client)
    assert code == status
    assert isinstance(body, dict)
    assert isinstance(body["detail"], str)


async def test_malformed_json_fault_truncates_the_body(client: Client, faults: Faults) -> None:
    faults.malformed = "json"
    async with client.get(USAGE_PATH, headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        text = await resp.text()
    assert text == '{"sessions_count": 1,'
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


async def test_malformed_empty_fault_is_an_empty_200(client: Client, faults: Faults) -> None:
    faults.malformed = "empty"
    async with client.get(USAGE_PATH, headers=AUTH) as resp:
        assert resp.status == 200
        assert await resp.read() == b""


@pytest.mark.parametrize(
    ("kind", "is_broken"),
    [
        ("types", lambda b: all(isinstance(b[f], str) for f in USAGE_FIELDS)),
        ("negative", lambda b: b["sessions_count"] < 0),
        ("huge", lambda b: b["sessions_count"] == 2**64),
        ("missing", lambda b: "prs_merged" not in b and len(b) == len(USAGE_FIELDS) - 1),
        ("array", lambda b: isinstance(b, list)),
    ],
)
async def test_malformed_fault_bodies_are_json_but_wrong(
    client: Client, faults: Faults, kind: str, is_broken: Callable[[object], bool]
) -> None:
    faults.update({"malformed": kind})
    status, body = await get_usage(client)
    assert status == 200
    assert is_broken(body), body


def test_malformed_kinds_are_exactly_the_seven_tested_here() -> None:
    assert set(MALFORMED_KINDS) == {
        "json",
        "types",
        "negative",
        "huge",
        "missing",
        "empty",
        "array",
    }


async def test_redirect_fault_sends_a_302_to_an_html_login_page(
    client: Client, faults: Faults
) -> None:
    faults.redirect = True
    async with client.get(USAGE_PATH, headers=AUTH, allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/login"
    async with client.get(USAGE_PATH, headers=AUTH) as resp:  # a client that follows it
        assert resp.status == 200
        assert resp.content_type == "text/html"


async def test_hang_fault_trips_the_client_timeout_and_still_shuts_down_cleanly() -> None:
    faults = Faults(hang=True)
    runner, url = await start_simulator(faults=faults)
    try:
        timeout = aiohttp.ClientTimeout(total=0.2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            began = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                async with session.get(url + USAGE_PATH, headers=AUTH) as resp:
                    await resp.read()
            assert time.monotonic() - began < 1.0
        [record] = runner.app[REQUESTS_KEY]
        assert record.status is None  # never answered
    finally:
        began = time.monotonic()
        await asyncio.wait_for(runner.cleanup(), timeout=1.5)
    assert time.monotonic() - began < 1.5


async def test_shutdown_releases_a_client_still_waiting_on_a_hung_request() -> None:
    app = create_app(faults=Faults(hang=True))
    arrived = asyncio.Event()

    @web.middleware
    async def note_arrival(request: web.Request, handler: Handler) -> web.StreamResponse:
        arrived.set()
        return await handler(request)

    app.middlewares.append(note_arrival)
    # aiohttp's default 60 s shutdown timeout: a quick stop proves the simulator let go itself.
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as session:
        pending = asyncio.create_task(
            session.get(f"http://127.0.0.1:{port}{USAGE_PATH}", headers=AUTH)
        )
        await asyncio.wait_for(arrived.wait(), timeout=2.0)
        began = time.monotonic()
        await asyncio.wait_for(runner.cleanup(), timeout=2.0)
        assert time.monotonic() - began < 1.0
        resp = await asyncio.wait_for(pending, timeout=1.0)
        assert resp.status == 503
        resp.release()
    [record] = app[REQUESTS_KEY]
    assert record.status == 503


async def test_start_simulator_resolves_port_zero(clock: FakeClock) -> None:
    runner, url = await start_simulator(clock=clock)
    try:
        match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)", url)
        assert match is not None
        assert int(match.group(1)) > 0
        async with (
            aiohttp.ClientSession() as session,
            session.get(url + USAGE_PATH, headers=AUTH) as resp,
        ):
            assert resp.status == 200
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------- rate limit


async def test_rate_limit_answers_429_with_retry_after_until_a_token_refills(
    client: Client, faults: Faults, clock: FakeClock
) -> None:
    faults.rate_limit_per_second = 2.0  # bucket of 2, refilling one token per 0.5 s
    assert [(await get_usage(client))[0] for _ in range(2)] == [200, 200]
    async with client.get(USAGE_PATH, headers=AUTH) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "1"
        assert await resp.json() == {"detail": "Too Many Requests"}
    clock.advance(0.5)
    assert (await get_usage(client))[0] == 200
    assert (await get_usage(client))[0] == 429


async def test_rate_limit_retry_after_says_how_long_until_a_token(
    client: Client, faults: Faults
) -> None:
    faults.rate_limit_per_second = 0.25
    assert (await get_usage(client))[0] == 200
    async with client.get(USAGE_PATH, headers=AUTH) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "4"


async def test_rate_limit_is_per_api_key(aiohttp_client: MakeClient, clock: FakeClock) -> None:
    client = await aiohttp_client(
        create_app(api_key=None, clock=clock, faults=Faults(rate_limit_per_second=1))
    )
    first, second = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    assert (await get_usage(client, headers=first))[0] == 200
    assert (await get_usage(client, headers=first))[0] == 429
    assert (await get_usage(client, headers=second))[0] == 200


# ------------------------------------------------------------------------- control plane


async def test_faults_endpoint_reports_and_switches_faults(client: Client, faults: Faults) -> None:
    async with client.get("/-/faults") as resp:
        assert await resp.json() == Faults().to_json()
    async with client.post("/-/faults", json={"status": 503, "latency": 0}) as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == 503
    assert faults.status == 503  # the object the app serves from, not a copy
    async with client.get(USAGE_PATH, headers=AUTH) as resp:
        assert resp.status == 503
    async with client.delete("/-/faults") as resp:
        assert await resp.json() == Faults().to_json()
    assert (await get_usage(client))[0] == 200


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        ({"status": 503, "lateny": 1}, "lateny"),
        ({"error_rate": 1.5}, "error_rate"),
        ({"malformed": "xml"}, "malformed"),
        ({"status": 200}, "status"),
        ({"hang": "yes"}, "hang"),
        ({"rate_limit_per_second": 0}, "rate_limit_per_second"),
        (["status", 503], "object"),
    ],
)
async def test_faults_endpoint_rejects_bad_changes_without_applying_any(
    client: Client, faults: Faults, body: object, mentions: str
) -> None:
    async with client.post("/-/faults", json=body) as resp:
        assert resp.status == 400
        assert mentions in (await resp.json())["detail"]
    assert faults == Faults()


def test_faults_constructor_validates() -> None:
    with pytest.raises(ValueError, match="error_rate"):
        Faults(error_rate=2.0)
    with pytest.raises(ValueError, match="latency"):
        Faults(latency=-1)


async def test_requests_are_recorded_with_repeated_keys_and_answered_status(
    client: Client, app: web.Application, faults: Faults
) -> None:
    params = window(NOW - timedelta(hours=1), NOW, org_ids=["org-1", "org-2"], user_ids=["u"])
    assert (await get_usage(client, params))[0] == 200
    assert (await get_usage(client, headers={}))[0] == 401
    async with client.get("/-/requests") as resp:
        recorded = await resp.json()
    assert recorded == [
        {
            "time": NOW.isoformat(),
            "method": "GET",
            "path": USAGE_PATH,
            "query": {
                "start_date": [rfc3339(NOW - timedelta(hours=1))],
                "end_date": [rfc3339(NOW)],
                "org_ids": ["org-1", "org-2"],
                "user_ids": ["u"],
            },
            "user_agent": recorded[0]["user_agent"],
            "status": 200,
        },
        {
            "time": NOW.isoformat(),
            "method": "GET",
            "path": USAGE_PATH,
            "query": {},
            "user_agent": recorded[1]["user_agent"],
            "status": 401,
        },
    ]
    assert recorded[0]["user_agent"].startswith("Python/")  # aiohttp's default, as sent
    in_process = app[REQUESTS_KEY]
    assert [r.status for r in in_process] == [200, 401]
    assert app[FAULTS_KEY] is faults
    async with client.delete("/-/requests") as resp:
        assert resp.status == 200
    assert not in_process


# ---------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_main_serves_on_a_free_port_and_exits_0_on_signal(signum: signal.Signals) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "DEVIN_API_KEY": "apk_user_from_env",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "exporter.simulator",
        "--listen",
        "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stderr is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=10)
        except TimeoutError:
            pytest.fail("simulator did not print its URL within 10 s")
        match = re.fullmatch(r"simulator listening on (http://127\.0\.0\.1:(\d+))\n", line.decode())
        assert match is not None, (line, await proc.stderr.read())
        url = match.group(1)
        assert int(match.group(2)) > 0
        async with aiohttp.ClientSession() as session:
            # The key comes from $DEVIN_API_KEY; the demo key is then refused.
            env_auth = {"Authorization": "Bearer apk_user_from_env"}
            async with session.get(url + USAGE_PATH, headers=env_auth) as resp:
                assert resp.status == 200
                assert set(await resp.json()) == set(USAGE_FIELDS)
            async with session.get(url + USAGE_PATH, headers=AUTH) as resp:
                assert resp.status == 401
        proc.send_signal(signum)
        assert await asyncio.wait_for(proc.wait(), timeout=5) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_main_rejects_a_malformed_listen_address(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--listen", "localhost"])
    assert exc.value.code == 2
    assert "HOST:PORT" in capsys.readouterr().err


def test_main_returns_1_when_the_port_is_taken(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--listen", f"127.0.0.1:{port}"]) == 1
    assert "cannot listen" in capsys.readouterr().err
