"""The API simulator's v3 routes and what they share with v2, over real loopback sockets."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.simulator import (
    DEFAULT_DEMO_KEY,
    DEFAULT_ORGANIZATIONS,
    DEFAULT_V3_TOKEN,
    ENTERPRISE_ORG_IDS,
    ENTERPRISE_USER_IDS,
    INCEPTION,
    MALFORMED_KINDS,
    ORGANIZATIONS_KEY,
    REQUESTS_KEY,
    USAGE_FIELDS,
    USAGE_PATH,
    Faults,
    Organization,
    billing_cycle,
    create_app,
    expected_active_users,
    expected_consumption_v2,
    expected_consumption_v3,
    expected_cycles_v2,
    expected_cycles_v3,
    expected_organizations_v2,
    expected_organizations_v3,
    expected_prs,
    expected_queue,
    expected_searches,
    expected_sessions,
    expected_usage,
    expected_usage_v3,
    main,
)

NOW = datetime(2026, 11, 24, 18, 7, 30, tzinfo=UTC)
V2_AUTH = {"Authorization": f"Bearer {DEFAULT_DEMO_KEY}"}
V3_AUTH = {"Authorization": f"Bearer {DEFAULT_V3_TOKEN}"}
QUEUE = "/v3/enterprise/queue"
V2_ORGS = "/v2/enterprise/organizations"
V3_ORGS = "/v3/enterprise/organizations"
SESSIONS = "/v3/enterprise/metrics/sessions"
PRS = "/v3/enterprise/metrics/prs"
SEARCHES = "/v3/enterprise/metrics/searches"
ACTIVE = "/v3/enterprise/metrics/active-users"
V3_USAGE = "/v3/enterprise/metrics/usage"
METRICS = (SESSIONS, PRS, SEARCHES, ACTIVE)
V2_CYCLES = "/v2/enterprise/consumption/cycles"
V2_DAILY = "/v2/enterprise/consumption/daily"
V3_CYCLES = "/v3/enterprise/consumption/cycles"
V3_DAILY = "/v3/enterprise/consumption/daily"
CYCLE_START = datetime(2026, 11, 5, 8, tzinfo=UTC)  # the billing cycle holding NOW
B = int(NOW.timestamp())  # NOW as v3 writes it
DAY = 86400

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]
Params = Sequence[tuple[str, str]]
JSON = dict[str, Any]  # a reply body, read by tests that know its shape


class FakeClock:
    """A settable clock, so every number is tested without sleeping."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


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


async def get(
    client: Client, path: str, params: Params = (), headers: Mapping[str, str] | None = None
) -> tuple[int, object]:
    """GET with the token of the path's version unless `headers` says otherwise."""
    if headers is None:
        headers = V3_AUTH if path.startswith("/v3/") else V2_AUTH
    async with client.get(path, params=list(params), headers=dict(headers)) as resp:
        return resp.status, await resp.json(content_type=None)


async def ok(client: Client, path: str, params: Params = ()) -> JSON:
    status, body = await get(client, path, params)
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def bounds(after: int, before: int, org_ids: Sequence[str] = (), user_ids: Sequence[str] = ()) -> list[tuple[str, str]]:
    """v3 query params: Unix-second bounds and arrays as repeated keys."""
    return [
        ("time_after", str(after)),
        ("time_before", str(before)),
        *(("org_ids", o) for o in org_ids),
        *(("user_ids", u) for u in user_ids),
    ]


def at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


async def pages_v2(client: Client, path: str, limit: int = 200, params: Params = ()) -> list[JSON]:
    """Every page of a v2 list, following `next_cursor` until `has_more` is false."""
    pages: list[JSON] = []
    skip = 0
    while True:
        page = await ok(client, path, [*params, ("skip", str(skip)), ("limit", str(limit))])
        assert set(page) == {"items", "total", "skip", "limit", "has_more", "next_cursor"}
        assert (page["skip"], page["limit"]) == (skip, limit)
        pages.append(page)
        if not page["has_more"]:
            assert page["next_cursor"] is None
            return pages
        assert isinstance(page["next_cursor"], int)
        skip = page["next_cursor"]
        assert len(pages) < 100, "runaway paging"


async def pages_v3(client: Client, path: str, first: int = 200, params: Params = ()) -> list[JSON]:
    """Every page of a v3 list, following `end_cursor` until `has_next_page` is false."""
    pages: list[JSON] = []
    after: list[tuple[str, str]] = []
    while True:
        page = await ok(client, path, [*params, ("first", str(first)), *after])
        assert set(page) == {"items", "has_next_page", "end_cursor", "total"}
        pages.append(page)
        if not page["has_next_page"]:
            assert page["end_cursor"] is None
            return pages
        assert isinstance(page["end_cursor"], str)
        after = [("after", page["end_cursor"])]
        assert len(pages) < 100, "runaway paging"


def items(pages: Sequence[JSON]) -> list[Any]:
    return [item for page in pages for item in page["items"]]


def assert_problem(body: object, status: int, path: str) -> JSON:
    """An RFC 9457 problem as v3 sends it: every member present, `detail` a string."""
    assert isinstance(body, dict)
    assert set(body) == {"type", "title", "status", "detail", "instance", "errors"}, body
    assert body["status"] == status
    assert body["instance"] == path
    assert isinstance(body["title"], str)
    assert isinstance(body["detail"], str)
    return body


# ---------------------------------------------------------------------------------- tokens


async def test_v3_paths_take_the_v3_token_and_answer_problem_json(client: Client) -> None:
    async with client.get(QUEUE, headers=V3_AUTH) as resp:
        assert resp.status == 200
    async with client.get(QUEUE) as resp:
        assert resp.status == 401
        assert resp.content_type == "application/problem+json"
        assert resp.headers["WWW-Authenticate"] == "Bearer"
        body = assert_problem(await resp.json(content_type=None), 401, QUEUE)
        assert body["detail"] == "Not authenticated"
        assert body["errors"] is None


@pytest.mark.parametrize(
    ("path", "token"),
    [
        (QUEUE, DEFAULT_DEMO_KEY),  # a v2 key on v3
        (QUEUE, "cog_wrong"),
        (USAGE_PATH, DEFAULT_V3_TOKEN),  # a v3 token on v2
        (USAGE_PATH, "apk_user_wrong"),
    ],
)
async def test_a_wrong_token_or_one_of_the_other_family_is_401(client: Client, path: str, token: str) -> None:
    status, body = await get(client, path, headers={"Authorization": f"Bearer {token}"})
    assert status == 401
    if path.startswith("/v3/"):
        assert assert_problem(body, 401, path)["detail"] == "Invalid token"
    else:
        assert body == {"detail": "Invalid API key"}


async def test_none_accepts_any_token_of_the_paths_family_only(aiohttp_client: MakeClient, clock: FakeClock) -> None:
    client = await aiohttp_client(create_app(api_key=None, v3_token=None, clock=clock))

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    assert (await get(client, QUEUE, headers=bearer("cog_anything")))[0] == 200
    assert (await get(client, QUEUE, headers=bearer("apk_user_anything")))[0] == 401
    assert (await get(client, QUEUE, headers=bearer("anything")))[0] == 401
    assert (await get(client, USAGE_PATH, headers=bearer("apk_anything")))[0] == 200
    assert (await get(client, USAGE_PATH, headers=bearer("cog_anything")))[0] == 401


async def test_a_custom_v3_token_replaces_the_default(aiohttp_client: MakeClient, clock: FakeClock) -> None:
    client = await aiohttp_client(create_app(v3_token="cog_custom", clock=clock))
    assert (await get(client, QUEUE, headers={"Authorization": "Bearer cog_custom"}))[0] == 200
    assert (await get(client, QUEUE))[0] == 401


@pytest.mark.parametrize(
    ("kwargs", "mentions"), [({"api_key": "cog_x"}, "api_key"), ({"v3_token": "apk_user_x"}, "v3_token")]
)
def test_create_app_refuses_a_token_of_the_wrong_family(kwargs: dict[str, str], mentions: str) -> None:
    with pytest.raises(ValueError, match=mentions):
        create_app(**kwargs)  # type: ignore[arg-type]


async def test_unknown_v3_path_is_a_problem_json_404(client: Client) -> None:
    path = "/v3/enterprise/nope"
    status, body = await get(client, path)
    assert status == 404
    assert assert_problem(body, 404, path)["detail"] == "Not Found"


async def test_wrong_method_on_a_v3_path_is_a_problem_json_405(client: Client) -> None:
    async with client.post(QUEUE, headers=V3_AUTH) as resp:
        assert resp.status == 405
        assert "GET" in resp.headers["Allow"].split(",")
        assert_problem(await resp.json(content_type=None), 405, QUEUE)


# ----------------------------------------------------------------------------------- queue


async def test_queue_answers_its_size_and_status(client: Client, clock: FakeClock) -> None:
    assert await ok(client, QUEUE) == expected_queue(NOW)
    clock.advance(6 * 3600)
    assert await ok(client, QUEUE) == expected_queue(clock.now)


def test_queue_moves_through_every_status_over_a_day_by_the_documented_thresholds() -> None:
    seen = set()
    for minute in range(0, 24 * 60, 5):
        body = expected_queue(NOW + timedelta(minutes=minute))
        size, status = body["queue_size"], body["status"]
        assert isinstance(size, int)
        assert size >= 0
        assert status == ("normal" if size <= 10 else "elevated" if size <= 50 else "high")
        seen.add(status)
    assert seen == {"normal", "elevated", "high"}
    # It moves within minutes too, so a demo polling it every minute sees it change.
    assert len({expected_queue(NOW + timedelta(minutes=m))["queue_size"] for m in range(10)}) > 1


# --------------------------------------------------------------------------- organizations


def test_default_organizations_are_the_enterprise_with_names_and_some_limits() -> None:
    assert tuple(o.org_id for o in DEFAULT_ORGANIZATIONS) == ENTERPRISE_ORG_IDS
    assert len({o.name for o in DEFAULT_ORGANIZATIONS}) == len(DEFAULT_ORGANIZATIONS)
    cycle_limits = [o.max_cycle_acu_limit for o in DEFAULT_ORGANIZATIONS]
    assert sum(isinstance(limit, int) for limit in cycle_limits) >= 2
    assert None in cycle_limits
    assert None in [o.max_session_acu_limit for o in DEFAULT_ORGANIZATIONS]


async def test_v2_organizations_come_in_pages_smaller_than_asked(client: Client) -> None:
    pages = await pages_v2(client, V2_ORGS, limit=200)
    assert [len(p["items"]) for p in pages] == [2, 2, 2]
    assert all(p["total"] == len(DEFAULT_ORGANIZATIONS) for p in pages)
    assert items(pages) == expected_organizations_v2(DEFAULT_ORGANIZATIONS)


async def test_v2_organization_items_have_the_documented_fields(client: Client) -> None:
    [first, *_] = items(await pages_v2(client, V2_ORGS))
    assert isinstance(first, dict)
    assert set(first) == {
        "org_id", "org_name", "created_at", "max_cycle_acu_limit", "max_session_acu_limit",
        "org_admin_count", "org_member_count", "org_user_count",
    }  # fmt: skip
    assert (first["org_id"], first["org_name"]) == ("org-platform-1", "Platform")
    assert datetime.strptime(first["created_at"], "%Y-%m-%dT%H:%M:%SZ") <= NOW.replace(tzinfo=None)
    for item in expected_organizations_v2(DEFAULT_ORGANIZATIONS):
        assert isinstance(item, dict)
        assert 0 < item["org_admin_count"] <= item["org_member_count"]
        assert 0 < item["org_user_count"] <= item["org_member_count"]


async def test_v2_limit_below_the_page_size_is_honoured(client: Client) -> None:
    pages = await pages_v2(client, V2_ORGS, limit=1)
    assert [len(p["items"]) for p in pages] == [1] * len(DEFAULT_ORGANIZATIONS)
    assert items(pages) == expected_organizations_v2(DEFAULT_ORGANIZATIONS)


async def test_v2_skip_beyond_the_end_is_an_empty_last_page(client: Client) -> None:
    page = await ok(client, V2_ORGS, [("skip", "50")])
    assert page == {"items": [], "total": 6, "skip": 50, "limit": 100, "has_more": False, "next_cursor": None}


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ([("skip", "-1")], {"type": "greater_than_equal", "loc": ["query", "skip"], "ctx": {"ge": 0}}),
        ([("limit", "0")], {"type": "greater_than_equal", "loc": ["query", "limit"], "ctx": {"ge": 1}}),
        ([("limit", "201")], {"type": "less_than_equal", "loc": ["query", "limit"], "ctx": {"le": 200}}),
        ([("limit", "ten")], {"type": "int_parsing", "loc": ["query", "limit"]}),
        ([("skip", "1.5")], {"type": "int_parsing", "loc": ["query", "skip"]}),
    ],
)
async def test_v2_bad_skip_or_limit_is_a_fastapi_422(client: Client, params: Params, error: JSON) -> None:
    status, body = await get(client, V2_ORGS, params)
    assert status == 422
    assert isinstance(body, dict)
    [entry] = body["detail"]
    assert entry.items() >= error.items()
    assert entry["input"] == params[0][1]
    assert isinstance(entry["msg"], str)


async def test_v3_organizations_come_in_pages_smaller_than_asked(client: Client) -> None:
    pages = await pages_v3(client, V3_ORGS, first=200)
    assert [len(p["items"]) for p in pages] == [2, 2, 2]
    assert all(p["total"] == len(DEFAULT_ORGANIZATIONS) for p in pages)
    assert items(pages) == expected_organizations_v3(DEFAULT_ORGANIZATIONS)
    [first, *_] = items(pages)
    assert isinstance(first, dict)
    assert set(first) == {
        "org_id", "name", "created_at", "updated_at", "max_cycle_acu_limit", "max_session_acu_limit"
    }  # fmt: skip
    assert first["created_at"] <= first["updated_at"] <= NOW.timestamp()


async def test_v3_first_below_the_page_size_is_honoured_and_page_size_is_per_app(
    client: Client, aiohttp_client: MakeClient, clock: FakeClock
) -> None:
    assert [len(p["items"]) for p in await pages_v3(client, V3_ORGS, first=1)] == [1] * 6
    roomy = await aiohttp_client(create_app(clock=clock, page_size=4))
    pages = await pages_v3(roomy, V3_ORGS)
    assert [len(p["items"]) for p in pages] == [4, 2]
    assert items(pages) == expected_organizations_v3(DEFAULT_ORGANIZATIONS)


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ([("first", "0")], {"type": "greater_than_equal", "loc": ["query", "first"], "ctx": {"ge": 1}}),
        ([("first", "201")], {"type": "less_than_equal", "loc": ["query", "first"], "ctx": {"le": 200}}),
        ([("first", "many")], {"type": "int_parsing", "loc": ["query", "first"]}),
        ([("after", "not-a-cursor")], {"type": "value_error", "loc": ["query", "after"]}),
    ],
)
async def test_v3_bad_first_or_cursor_is_a_problem_422(client: Client, params: Params, error: JSON) -> None:
    status, body = await get(client, V3_ORGS, params)
    assert status == 422
    problem = assert_problem(body, 422, V3_ORGS)
    [entry] = problem["errors"]
    assert entry.items() >= error.items()
    assert {"loc", "msg", "type"} <= set(entry)
    assert problem["detail"] == f"query.{params[0][0]}: {entry['msg']}"


SEVEN = [*DEFAULT_ORGANIZATIONS, Organization("org-7", "Seventh")]


@pytest.mark.parametrize("page_size", [1, 2, 3, 7, 50])
@pytest.mark.parametrize("asked", [1, 2, 5, 200])
async def test_both_paging_styles_list_every_item_once_whatever_the_sizes(
    aiohttp_client: MakeClient, clock: FakeClock, page_size: int, asked: int
) -> None:
    client = await aiohttp_client(create_app(clock=clock, organizations=SEVEN, page_size=page_size))
    per_page = min(page_size, asked)
    v2_pages, v3_pages = await pages_v2(client, V2_ORGS, limit=asked), await pages_v3(client, V3_ORGS, first=asked)
    for pages in (v2_pages, v3_pages):
        assert [len(p["items"]) for p in pages[:-1]] == [per_page] * (len(pages) - 1)
        assert 0 < len(pages[-1]["items"]) <= per_page
    assert items(v2_pages) == expected_organizations_v2(SEVEN)
    assert items(v3_pages) == expected_organizations_v3(SEVEN)


async def test_organizations_control_endpoint_lists_renames_adds_and_removes(
    client: Client, app: web.Application, clock: FakeClock
) -> None:
    async with client.get("/-/organizations") as resp:
        listed = await resp.json()
    assert listed == [
        {"org_id": o.org_id, "name": o.name, "max_cycle_acu_limit": o.max_cycle_acu_limit,
         "max_session_acu_limit": o.max_session_acu_limit}
        for o in DEFAULT_ORGANIZATIONS
    ]  # fmt: skip
    before = {o["org_id"]: o for o in items(await pages_v3(client, V3_ORGS))}
    clock.advance(3600)
    changed = [
        {**listed[2], "name": "Mobile Apps"},  # renamed
        listed[0],  # unchanged, moved to second
        {"org_id": "org-new", "name": "New Team", "max_cycle_acu_limit": 5000, "max_session_acu_limit": None},
    ]
    async with client.put("/-/organizations", json=changed) as resp:
        assert resp.status == 200
        assert await resp.json() == changed
    assert [o.org_id for o in app[ORGANIZATIONS_KEY]] == ["org-mobile", "org-platform-1", "org-new"]

    v3 = {o["org_id"]: o for o in items(await pages_v3(client, V3_ORGS))}
    now = int(clock.now.timestamp())
    assert v3["org-mobile"]["name"] == "Mobile Apps"
    assert v3["org-mobile"]["created_at"] == before["org-mobile"]["created_at"]
    assert v3["org-mobile"]["updated_at"] == now
    assert v3["org-platform-1"] == before["org-platform-1"]
    assert v3["org-new"]["created_at"] == v3["org-new"]["updated_at"] == now
    v2 = items(await pages_v2(client, V2_ORGS))
    assert [o["org_name"] for o in v2] == ["Mobile Apps", "Platform", "New Team"]
    assert v2 == expected_organizations_v2(app[ORGANIZATIONS_KEY])


async def test_the_enterprise_is_the_organizations_listed_now(client: Client, app: web.Application) -> None:
    start = NOW - timedelta(hours=6)
    params = [("start_date", start.strftime("%Y-%m-%dT%H:%M:%SZ")), ("end_date", NOW.strftime("%Y-%m-%dT%H:%M:%SZ"))]
    assert await ok(client, USAGE_PATH, params) == expected_usage([], [], start, NOW, now=NOW)
    app[ORGANIZATIONS_KEY][:] = [Organization("org-123", "Payments"), Organization("org-x", "X")]
    after = await ok(client, USAGE_PATH, params)
    assert after == expected_usage([], [], start, NOW, now=NOW, enterprise_org_ids=["org-123", "org-x"])
    assert after == expected_usage(["org-123", "org-x"], [], start, NOW, now=NOW)
    assert set(after) == set(USAGE_FIELDS)


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        ({"org_id": "a", "name": "A"}, "list"),
        (["org-a"], "organizations[0] must be an object"),
        ([{"org_id": "a"}], "organizations[0].name"),
        ([{"org_id": "", "name": "A"}], "organizations[0].org_id"),
        ([{"org_id": "a", "name": "A", "colour": "red"}], "colour"),
        ([{"org_id": "a", "name": "A", "max_cycle_acu_limit": -1}], "max_cycle_acu_limit"),
        ([{"org_id": "a", "name": "A", "max_session_acu_limit": True}], "max_session_acu_limit"),
        ([{"org_id": "a", "name": "A", "max_cycle_acu_limit": 1.5}], "max_cycle_acu_limit"),
        ([{"org_id": "a", "name": "A"}, {"org_id": "a", "name": "B"}], "twice"),
    ],
)
async def test_organizations_control_endpoint_rejects_bad_lists_without_applying_any(
    client: Client, app: web.Application, body: object, mentions: str
) -> None:
    async with client.put("/-/organizations", json=body) as resp:
        assert resp.status == 400
        assert mentions in (await resp.json())["detail"]
    assert app[ORGANIZATIONS_KEY] == list(DEFAULT_ORGANIZATIONS)
    async with client.put("/-/organizations", data=b"{not json") as resp:
        assert resp.status == 400


# ------------------------------------------------------------------------ v3 metrics: 422s


@pytest.mark.parametrize("path", METRICS)
async def test_metrics_without_bounds_are_a_422_naming_both(client: Client, path: str) -> None:
    status, body = await get(client, path, [("org_ids", "org-123")])
    assert status == 422
    problem = assert_problem(body, 422, path)
    assert [(e["loc"], e["type"], e["msg"]) for e in problem["errors"]] == [
        (["query", "time_after"], "missing", "Field required"),
        (["query", "time_before"], "missing", "Field required"),
    ]
    assert problem["detail"] == "query.time_after: Field required; query.time_before: Field required"


@pytest.mark.parametrize("path", METRICS)
@pytest.mark.parametrize("value", ["2026-11-24T18:00:00Z", "1.5", "", "soon"])
async def test_metrics_with_non_integer_bounds_are_a_422(client: Client, path: str, value: str) -> None:
    status, body = await get(client, path, [("time_after", value), ("time_before", str(B))])
    assert status == 422
    [entry] = assert_problem(body, 422, path)["errors"]
    assert entry["loc"] == ["query", "time_after"]
    assert entry["type"] == "int_parsing"
    assert entry["input"] == value


@pytest.mark.parametrize("path", [*METRICS, V3_USAGE])
async def test_metrics_with_after_past_before_are_a_422(client: Client, path: str) -> None:
    status, body = await get(client, path, bounds(B, B - 1))
    assert status == 422
    [entry] = assert_problem(body, 422, path)["errors"]
    assert (entry["loc"], entry["type"]) == (["query", "time_after"], "value_error")


@pytest.mark.parametrize(("name", "value"), [("min_sessions", "-1"), ("min_searches", "x")])
async def test_active_users_minimums_are_integers_from_zero(client: Client, name: str, value: str) -> None:
    status, body = await get(client, ACTIVE, [*bounds(B - DAY, B), (name, value)])
    assert status == 422
    [entry] = assert_problem(body, 422, ACTIVE)["errors"]
    assert entry["loc"] == ["query", name]


async def test_every_bad_parameter_is_reported_at_once_in_declaration_order(client: Client) -> None:
    status, body = await get(client, ACTIVE, [("min_searches", "-3"), ("time_before", "later")])
    assert status == 422
    errors = assert_problem(body, 422, ACTIVE)["errors"]
    assert [e["loc"][1] for e in errors] == ["time_after", "time_before", "min_searches"]


# ---------------------------------------------------------------------- v3 metrics: values


async def test_metrics_routes_serve_what_the_expected_helpers_say(client: Client) -> None:
    orgs, users = ["org-123", "org-mobile"], ["user-1", "user-2"]
    params = bounds(B - 7 * DAY, B, orgs, users)
    assert await ok(client, SESSIONS, params) == expected_sessions(orgs, users, B - 7 * DAY, B, now=NOW)
    assert await ok(client, PRS, params) == expected_prs(orgs, users, B - 7 * DAY, B, now=NOW)
    # searches takes no user_ids: the parameter is ignored, as FastAPI ignores unknown ones.
    assert await ok(client, SEARCHES, params) == expected_searches(orgs, B - 7 * DAY, B, now=NOW)
    extra = [("min_sessions", "2"), ("min_searches", "4")]
    assert await ok(client, ACTIVE, [*params, *extra]) == expected_active_users(
        orgs, B - 7 * DAY, B, now=NOW, min_sessions=2, min_searches=4
    )
    assert await ok(client, V3_USAGE, params[:2]) == expected_usage_v3(B - 7 * DAY, B, now=NOW)


async def test_sessions_metrics_have_the_documented_shape(client: Client) -> None:
    body = await ok(client, SESSIONS, bounds(B - DAY, B))
    assert set(body) == {
        "sessions_created_count", "sessions_created_with_playbook_count", "sessions_created_with_search_count",
        "sessions_with_merged_prs_count", "avg_acus_per_session", "sessions_created_by_origin",
        "sessions_created_by_size", "sessions_with_merged_prs_by_size",
    }  # fmt: skip
    assert set(body["sessions_created_by_origin"]) == {
        "api", "automation", "desktop", "jira", "linear", "slack", "teams", "webapp"
    }  # fmt: skip
    assert set(body["sessions_created_by_size"]) == set(body["sessions_with_merged_prs_by_size"]) == {
        "xs", "s", "m", "l", "xl"
    }  # fmt: skip
    assert isinstance(body["avg_acus_per_session"], float)
    assert body["sessions_created_count"] > 0


async def test_v3_usage_defaults_to_the_billing_cycle_and_agrees_with_v2(client: Client) -> None:
    body = await ok(client, V3_USAGE)
    v2 = expected_usage([], [], None, None, now=NOW)
    cycle_start = int(datetime(2026, 11, 5, 8, tzinfo=UTC).timestamp())
    assert body == {
        "sessions_count": v2["sessions_count"],
        "searches_count": v2["searches_count"],
        "prs_created_count": expected_prs([], [], cycle_start, B, now=NOW)["prs_created_count"],
        "prs_merged_count": v2["prs_merged"],
    }


async def test_metrics_stop_at_now(client: Client, clock: FakeClock) -> None:
    future = await ok(client, SESSIONS, bounds(B - DAY, B + DAY))
    assert future == await ok(client, SESSIONS, bounds(B - DAY, B))
    clock.advance(3600)
    assert (await ok(client, SESSIONS, bounds(B - DAY, B + DAY)))["sessions_created_count"] > future[
        "sessions_created_count"
    ]


ORG_POOL = [*ENTERPRISE_ORG_IDS, "org-x", "org-y"]
org_lists = st.lists(st.sampled_from(ORG_POOL), max_size=4)
user_lists = st.lists(st.sampled_from([f"user-{i}" for i in range(1, 20)]), max_size=3)
# Windows within the last 90 days of NOW, sometimes reaching past it.
windows = st.tuples(st.integers(0, 90 * DAY), st.integers(0, 30 * DAY)).map(
    lambda w: (B - w[0], B - w[0] + w[1])
)


@settings(max_examples=150, deadline=None)
@given(org_ids=org_lists, user_ids=user_lists, window=windows)
def test_v3_counts_equal_v2_usage_for_the_same_bounds_and_filters(
    org_ids: list[str], user_ids: list[str], window: tuple[int, int]
) -> None:
    after, before = window
    v2 = expected_usage(org_ids, user_ids, at(after), at(before), now=NOW)
    sessions = expected_sessions(org_ids, user_ids, after, before, now=NOW)
    prs = expected_prs(org_ids, user_ids, after, before, now=NOW)
    assert sessions["sessions_created_count"] == v2["sessions_count"]
    assert (prs["prs_opened_count"], prs["prs_closed_count"], prs["prs_merged_count"]) == (
        v2["prs_opened"],
        v2["prs_closed"],
        v2["prs_merged"],
    )
    v2_searches = expected_usage(org_ids, [], at(after), at(before), now=NOW)["searches_count"]
    assert expected_searches(org_ids, after, before, now=NOW) == {"searches_created_count": v2_searches}


@settings(max_examples=150, deadline=None)
@given(org_ids=org_lists, user_ids=user_lists, window=windows)
def test_session_details_never_exceed_sessions_and_breakdowns_sum_to_them(
    org_ids: list[str], user_ids: list[str], window: tuple[int, int]
) -> None:
    body = expected_sessions(org_ids, user_ids, *window, now=NOW)
    sessions = body["sessions_created_count"]
    assert isinstance(sessions, int)
    for name in ("sessions_created_with_playbook_count", "sessions_created_with_search_count",
                 "sessions_with_merged_prs_count"):  # fmt: skip
        assert 0 <= body[name] <= sessions  # type: ignore[operator]
    for name in ("sessions_created_by_origin", "sessions_created_by_size"):
        breakdown = body[name]
        assert isinstance(breakdown, dict)
        assert all(v >= 0 for v in breakdown.values())  # type: ignore[operator]
        assert sum(breakdown.values()) == sessions  # type: ignore[arg-type]
    merged_by_size = body["sessions_with_merged_prs_by_size"]
    assert isinstance(merged_by_size, dict)
    assert sum(merged_by_size.values()) == body["sessions_with_merged_prs_count"]  # type: ignore[arg-type]
    prs = expected_prs(org_ids, user_ids, *window, now=NOW)
    assert 0 <= prs["prs_merged_count"] <= prs["prs_closed_count"] <= prs["prs_opened_count"]  # type: ignore[operator]
    assert prs["prs_opened_count"] <= prs["prs_created_count"]  # type: ignore[operator]
    assert body["sessions_with_merged_prs_count"] <= prs["prs_merged_count"]  # type: ignore[operator]
    avg = body["avg_acus_per_session"]
    assert isinstance(avg, float)
    if sessions == 0:
        assert avg == 0.0
    elif sessions >= 50:  # a handful of sessions can fall either side of an ACU boundary
        assert 0.5 < avg < 5.0


def active(org_ids: Sequence[str], hours: float, **minimums: int) -> int:
    count = expected_active_users(org_ids, B - round(hours * 3600), B, now=NOW, **minimums)["active_users"]
    assert isinstance(count, int)
    return count


@settings(max_examples=100, deadline=None)
@given(
    org_ids=org_lists,
    hours=st.tuples(st.floats(0.5, 24 * 60), st.floats(1.0, 10.0)),
    minimums=st.tuples(st.integers(0, 30), st.integers(0, 30)),
)
def test_active_users_grow_sub_linearly_and_stay_within_the_users(
    org_ids: list[str], hours: tuple[float, float], minimums: tuple[int, int]
) -> None:
    short, factor = hours
    kw = {"min_sessions": minimums[0], "min_searches": minimums[1]}
    few, more = active(org_ids, short, **kw), active(org_ids, short * factor, **kw)
    orgs = list(dict.fromkeys(org_ids)) or list(ENTERPRISE_ORG_IDS)
    # Concave through 0 per org, so factor times as long has at most factor times as many users,
    # give or take the rounding down of each org's count.
    assert few <= more < (few + len(orgs)) * factor
    listed = expected_organizations_v2([Organization(o, o) for o in orgs])
    users, members = (sum(item[name] for item in listed) for name in ("org_user_count", "org_member_count"))
    assert more <= users <= members
    assert active(org_ids, short, min_sessions=0) == active(org_ids, short, min_searches=0) == users


@settings(max_examples=100, deadline=None)
@given(
    org_ids=org_lists,
    extra=org_lists,
    hours=st.floats(0.5, 24 * 60),
    minimums=st.tuples(st.integers(1, 20), st.integers(1, 20)),
)
def test_active_users_fall_as_minimums_rise_and_never_shrink_with_more_orgs(
    org_ids: list[str], extra: list[str], hours: float, minimums: tuple[int, int]
) -> None:
    s, q = minimums
    orgs = org_ids or ["org-123"]  # a superset of "everyone" is everyone: start from a filter
    base = active(orgs, hours, min_sessions=s, min_searches=q)
    assert active(orgs, hours, min_sessions=s + 1, min_searches=q) <= base
    assert active(orgs, hours, min_sessions=s, min_searches=q + 1) <= base
    assert active([*orgs, *extra], hours, min_sessions=s, min_searches=q) >= base


def test_active_users_look_like_adoption_figures() -> None:
    day, week, month = active([], 24), active([], 24 * 7), active([], 24 * 30)
    assert 0 < day < week < month
    assert day < 0.5 * month  # DAU well below MAU


# ------------------------------------------------------------------------- billing cycles


def rfc3339(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_v2_cycles_are_a_bare_array_from_inception_to_the_current_cycle(client: Client) -> None:
    status, body = await get(client, V2_CYCLES)
    assert status == 200
    assert body == expected_cycles_v2(NOW)
    assert isinstance(body, list)
    assert body[0]["start"] == rfc3339(INCEPTION)
    assert body[-1] == {"start": rfc3339(CYCLE_START), "end": "2026-12-05T08:00:00Z"}
    for earlier, later in itertools.pairwise(body):
        assert earlier["end"] == later["start"]
        assert later["start"].endswith("-05T08:00:00Z")


async def test_v3_cycles_come_in_pages_and_match_v2(client: Client) -> None:
    pages = await pages_v3(client, V3_CYCLES)
    assert all(len(p["items"]) <= 2 for p in pages)
    assert len(pages) == (len(expected_cycles_v2(NOW)) + 1) // 2
    cycles = items(pages)
    assert cycles == expected_cycles_v3(NOW)
    as_v2 = [{"start": rfc3339(at(c["after"])), "end": rfc3339(at(c["before"]))} for c in cycles]
    assert as_v2 == expected_cycles_v2(NOW)
    start, end = billing_cycle(NOW)
    assert cycles[-1] == {"after": int(start.timestamp()), "before": int(end.timestamp())}


async def test_the_current_cycle_is_what_dateless_queries_mean(client: Client) -> None:
    cycle = items(await pages_v3(client, V3_CYCLES))[-1]
    start = at(cycle["after"])
    assert await ok(client, USAGE_PATH) == expected_usage([], [], start, NOW, now=NOW)
    assert await ok(client, V2_DAILY) == expected_consumption_v2([], start, NOW, now=NOW)
    assert await ok(client, V3_DAILY) == expected_consumption_v3(cycle["after"], B, now=NOW)


# ---------------------------------------------------------------------------- consumption


def cents(value: object) -> int:
    """An ACU figure in exact hundredths (the simulator sends at most two decimals)."""
    assert isinstance(value, float), value
    hundredths = Decimal(repr(value)) * 100
    assert hundredths == hundredths.to_integral_value(), value
    return int(hundredths)


def v3_days(body: Mapping[str, Any]) -> list[tuple[int, int, dict[str, int]]]:
    """(date, acus, products) per day in hundredths, checking that the products sum to the day."""
    days = []
    for entry in body["consumption_by_date"]:
        assert set(entry) == {"date", "acus", "acus_by_product"}
        products = {k: cents(v) for k, v in entry["acus_by_product"].items()}
        assert set(products) == {"devin", "cascade", "terminal", "review"}
        assert sum(products.values()) == cents(entry["acus"])
        days.append((entry["date"], cents(entry["acus"]), products))
    assert sum(acus for _, acus, _ in days) == cents(body["total_acus"])
    return days


async def test_v3_enterprise_consumption_holds_together(client: Client) -> None:
    body = await ok(client, V3_DAILY)
    assert set(body) == {"total_acus", "consumption_by_date"}
    days = v3_days(body)
    # Billing days start at 08:00 UTC: the cycle's first day to today's, each named by its start.
    assert [d for d, _, _ in days] == [int((CYCLE_START + timedelta(days=i)).timestamp()) for i in range(20)]
    per_org = [v3_days(await ok(client, f"{V3_DAILY}/organizations/{o}")) for o in ENTERPRISE_ORG_IDS]
    for i, (_, acus, products) in enumerate(days):
        assert products["devin"] == sum(org[i][2]["devin"] for org in per_org)
        assert acus == products["devin"] + products["cascade"] + products["terminal"] + products["review"]
        assert products["cascade"] > 0 and products["terminal"] > 0
    # The enterprise's ACUs less what no org owns are the orgs' ACUs.
    unowned = sum(p["cascade"] + p["terminal"] + p["review"] for _, _, p in days)
    assert cents(body["total_acus"]) - unowned == sum(sum(a for _, a, _ in org) for org in per_org)


async def test_v3_org_and_user_consumption_are_devin_only(client: Client) -> None:
    for path in (f"{V3_DAILY}/organizations/org-mobile", f"{V3_DAILY}/users/user-7"):
        days = v3_days(await ok(client, path, bounds(B - 3 * DAY, B)))
        assert len(days) == 4  # three days back from 18:07 touches four billing days
        assert all(p["cascade"] == p["terminal"] == p["review"] == 0 for _, _, p in days)
        assert all(p["devin"] > 0 for _, _, p in days)


async def test_v3_consumption_of_an_org_not_listed_is_a_404(client: Client, app: web.Application) -> None:
    path = f"{V3_DAILY}/organizations/org-nope"
    status, body = await get(client, path)
    assert status == 404
    assert "org-nope" in assert_problem(body, 404, path)["detail"]
    app[ORGANIZATIONS_KEY][:] = [o for o in app[ORGANIZATIONS_KEY] if o.org_id != "org-mobile"]
    assert (await get(client, f"{V3_DAILY}/organizations/org-mobile"))[0] == 404
    # and the enterprise no longer counts it
    assert await ok(client, V3_DAILY) == expected_consumption_v3(
        None, None, now=NOW, enterprise_org_ids=[o.org_id for o in app[ORGANIZATIONS_KEY]]
    )


async def test_v3_consumption_bounds_are_optional_integers(client: Client) -> None:
    assert (await get(client, V3_DAILY, [("time_after", "yesterday")]))[0] == 422
    status, body = await get(client, V3_DAILY, bounds(B, B - 1))
    assert status == 422
    assert_problem(body, 422, V3_DAILY)
    only_after = await ok(client, V3_DAILY, [("time_after", str(B - DAY))])
    assert only_after == await ok(client, V3_DAILY, bounds(B - DAY, B))
    only_before = await ok(client, V3_DAILY, [("time_before", str(B - DAY))])
    assert only_before == expected_consumption_v3(int(CYCLE_START.timestamp()), B - DAY, now=NOW)


async def test_a_partial_billing_day_counts_its_part_inside_the_window(client: Client) -> None:
    eight = int(datetime(2026, 11, 20, 8, tzinfo=UTC).timestamp())
    straddling = v3_days(await ok(client, V3_DAILY, bounds(eight - 2 * 3600, eight + 2 * 3600)))
    assert [d for d, _, _ in straddling] == [eight - DAY, eight]
    before, after = (
        v3_days(await ok(client, V3_DAILY, bounds(eight - 2 * 3600, eight))),
        v3_days(await ok(client, V3_DAILY, bounds(eight, eight + 2 * 3600))),
    )
    assert [d for d, _, _ in before + after] == [eight - DAY, eight]
    assert [a for _, a, _ in straddling] == [before[0][1], after[0][1]]
    # Clipped to now: today's entry holds the day so far, and the future adds nothing.
    assert await ok(client, V3_DAILY, bounds(B - 3600, B + DAY)) == await ok(client, V3_DAILY, bounds(B - 3600, B))
    assert (await ok(client, V3_DAILY, bounds(B + 3600, B + DAY))) == {"total_acus": 0.0, "consumption_by_date": []}


def v2_days(body: Mapping[str, Any]) -> dict[str, int]:
    days = {day: cents(acus) for day, acus in body["consumption_by_date"].items()}
    assert sum(days.values()) == cents(body["total_acus"])
    return days


async def test_v2_enterprise_consumption_holds_together_and_matches_v3(client: Client) -> None:
    body = await ok(client, V2_DAILY)
    assert set(body) == {"total_acus", "consumption_by_date", "consumption_by_org_id", "consumption_by_user"}
    days = v2_days(body)
    assert list(days) == [f"2026-11-{d:02}" for d in range(5, 25)]
    assert set(body["consumption_by_org_id"]) == set(ENTERPRISE_ORG_IDS)
    v3 = v3_days(expected_consumption_v3(None, None, now=NOW))
    assert list(days.values()) == [acus for _, acus, _ in v3]
    unowned = sum(p["cascade"] + p["terminal"] + p["review"] for _, _, p in v3)
    assert sum(cents(v) for v in body["consumption_by_org_id"].values()) == cents(body["total_acus"]) - unowned


async def test_v2_consumption_with_org_ids_counts_only_their_devin_acus(client: Client) -> None:
    start, end = datetime(2026, 11, 10, 12, tzinfo=UTC), datetime(2026, 11, 12, 12, tzinfo=UTC)
    orgs = ["org-123", "org-456"]
    params = [("start_date", rfc3339(start)), ("end_date", rfc3339(end)), *(("org_ids", o) for o in orgs)]
    body = await ok(client, V2_DAILY, params)
    assert body == expected_consumption_v2(orgs, start, end, now=NOW)
    assert list(v2_days(body)) == ["2026-11-10", "2026-11-11", "2026-11-12"]
    assert set(body["consumption_by_org_id"]) == set(orgs)
    assert sum(cents(v) for v in body["consumption_by_org_id"].values()) == cents(body["total_acus"])
    per_org = [expected_consumption_v3(int(start.timestamp()), int(end.timestamp()), now=NOW, org_id=o) for o in orgs]
    assert cents(body["total_acus"]) == sum(cents(c["total_acus"]) for c in per_org)


async def test_v2_user_consumption_is_what_the_enterprise_lists_for_the_user(client: Client) -> None:
    enterprise = await ok(client, V2_DAILY)
    assert set(enterprise["consumption_by_user"]) == set(ENTERPRISE_USER_IDS)
    for user in ("user-1", "user-12"):
        mine = await ok(client, f"{V2_DAILY}/{user}")
        assert set(mine) == {"total_acus", "consumption_by_date", "consumption_by_org_id"}
        v2_days(mine)
        assert mine["total_acus"] == enterprise["consumption_by_user"][user]
        assert mine == expected_consumption_v2([], None, None, now=NOW, user_id=user)
        v3 = expected_consumption_v3(int(CYCLE_START.timestamp()), B, now=NOW, user_id=user)
        assert mine["total_acus"] == v3["total_acus"]


async def test_v2_consumption_rejects_bad_dates_like_usage(client: Client) -> None:
    status, body = await get(client, V2_DAILY, [("start_date", "soon"), ("end_date", rfc3339(NOW))])
    assert status == 422
    assert body["detail"][0]["loc"] == ["query", "start_date"]  # type: ignore[index]


async def test_avg_acus_per_session_is_consistent_with_consumption() -> None:
    for org in ENTERPRISE_ORG_IDS:
        sessions = expected_sessions([org], [], B - 7 * DAY, B, now=NOW)
        spent = expected_consumption_v3(B - 7 * DAY, B, now=NOW, org_id=org)
        count, avg = sessions["sessions_created_count"], sessions["avg_acus_per_session"]
        assert abs(avg * count - spent["total_acus"]) < 1e-6  # type: ignore[operator]


@settings(max_examples=60, deadline=None)
@given(org_ids=org_lists, window=windows, user=st.sampled_from(["user-1", "user-5", "someone"]))
def test_consumption_sums_exactly_for_any_window(org_ids: list[str], window: tuple[int, int], user: str) -> None:
    after, before = window
    enterprise = expected_consumption_v3(after, before, now=NOW)
    days = v3_days(enterprise)
    orgs = [v3_days(expected_consumption_v3(after, before, now=NOW, org_id=o)) for o in ENTERPRISE_ORG_IDS]
    for i, (date, _, products) in enumerate(days):
        assert (date - int(INCEPTION.timestamp())) % DAY == 0  # a billing-day start
        assert products["devin"] == sum(org[i][2]["devin"] for org in orgs)
    v3_days(expected_consumption_v3(after, before, now=NOW, user_id=user))
    v2 = expected_consumption_v2(org_ids, at(after), at(before), now=NOW)
    v2_days(v2)
    if not org_ids:
        assert v2["total_acus"] == enterprise["total_acus"]


# ------------------------------------------------------------------------- faults, every path

# Every API route with a query it answers 200 to. A test below checks that none is missing.
ROUTES: list[tuple[str, list[tuple[str, str]]]] = [
    (USAGE_PATH, []),
    (V2_ORGS, []),
    (V2_CYCLES, []),
    (V2_DAILY, []),
    (f"{V2_DAILY}/user-1", []),
    (SESSIONS, bounds(B - DAY, B)),
    (PRS, bounds(B - DAY, B)),
    (SEARCHES, bounds(B - DAY, B)),
    (ACTIVE, bounds(B - DAY, B)),
    (V3_USAGE, []),
    (QUEUE, []),
    (V3_CYCLES, []),
    (V3_DAILY, []),
    (f"{V3_DAILY}/organizations/org-123", []),
    (f"{V3_DAILY}/users/user-1", []),
    (V3_ORGS, []),
]
ROUTE_IDS = [path for path, _ in ROUTES]


def test_the_route_list_here_covers_every_api_route_of_the_app(app: web.Application) -> None:
    templates = {
        r.canonical for r in app.router.resources() if r.canonical.startswith(("/v2/", "/v3/"))
    }
    covered = {
        path.replace("/user-1", "/{user_id}").replace("/org-123", "/{org_id}") for path, _ in ROUTES
    }
    assert covered == templates


@pytest.mark.parametrize(("path", "params"), ROUTES, ids=ROUTE_IDS)
async def test_every_route_answers_its_versions_token_only(client: Client, path: str, params: Params) -> None:
    assert (await get(client, path, params))[0] == 200
    other = V2_AUTH if path.startswith("/v3/") else V3_AUTH
    assert (await get(client, path, params, headers=other))[0] == 401


@pytest.mark.parametrize(("path", "params"), ROUTES, ids=ROUTE_IDS)
async def test_status_faults_answer_on_every_route_in_its_versions_shape(
    client: Client, faults: Faults, path: str, params: Params
) -> None:
    faults.status = 503
    async with client.get(path, params=params, headers=V3_AUTH if path.startswith("/v3/") else V2_AUTH) as resp:
        assert resp.status == 503
        assert resp.content_type == "text/html"  # a load balancer's page, either version
    faults.status = 429
    async with client.get(path, params=params, headers=V3_AUTH if path.startswith("/v3/") else V2_AUTH) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "1"
        body = await resp.json(content_type=None)
    if path.startswith("/v3/"):
        assert resp.content_type == "application/problem+json"
        assert_problem(body, 429, path)
    else:
        assert body == {"detail": "Too Many Requests"}


def leaves(value: object, where: tuple[object, ...] = ()) -> Iterator[tuple[tuple[object, ...], object]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, (*where, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, (*where, i))
    else:
        yield where, value


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
@pytest.mark.parametrize(("path", "params"), ROUTES, ids=ROUTE_IDS)
async def test_malformed_faults_break_every_reply_shape(
    client: Client, faults: Faults, path: str, params: Params, kind: str
) -> None:
    good = await get(client, path, params)
    faults.update({"malformed": kind})
    async with client.get(path, params=params, headers=V3_AUTH if path.startswith("/v3/") else V2_AUTH) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        text = await resp.text()
    if kind in ("json", "empty"):
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
        return
    bad = json.loads(text)
    assert bad != good[1]
    good_leaves, bad_leaves = dict(leaves(good[1])), dict(leaves(bad))
    if kind == "types":
        assert good_leaves.keys() == bad_leaves.keys()
        for where, value in good_leaves.items():
            retyped = bad_leaves[where]
            if isinstance(value, float):  # ACUs: a client may take numeric strings, so not one
                assert isinstance(retyped, str)
                with pytest.raises(ValueError):
                    float(retyped)
            elif is_number(value) or isinstance(value, bool):
                assert retyped == json.dumps(value), where
            elif isinstance(value, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", value):  # v2's
                assert isinstance(retyped, int), where
    elif kind == "negative":
        assert set(bad_leaves.values()) & {-1, "1969-12-31T23:59:59Z"}
    elif kind == "huge":
        assert set(bad_leaves.values()) & {2**64, "10000-01-01T00:00:00Z"}
    elif kind == "missing":
        assert len(bad_leaves) < len(good_leaves)
    else:  # array
        assert type(bad) is not type(good[1])


async def test_faults_with_paths_apply_only_under_those_prefixes(client: Client, faults: Faults) -> None:
    faults.update({"status": 403, "paths": ["/v3/enterprise/consumption"]})
    for path in (V3_DAILY, V3_CYCLES, f"{V3_DAILY}/organizations/org-123"):
        status, body = await get(client, path)
        assert status == 403
        assert "ViewAccountConsumption" in assert_problem(body, 403, path)["detail"]
    for path, params in ROUTES:
        if not path.startswith("/v3/enterprise/consumption"):
            assert (await get(client, path, params))[0] == 200, path


@pytest.mark.parametrize(
    ("path", "permission"),
    [(SESSIONS, "ViewAccountMetrics"), (QUEUE, "ViewAccountMetrics"), (V3_ORGS, "ManageOrganizations")],
)
async def test_a_403_on_v3_names_the_permission_the_path_needs(
    client: Client, faults: Faults, path: str, permission: str
) -> None:
    faults.status = 403
    status, body = await get(client, path)
    assert status == 403
    assert permission in assert_problem(body, 403, path)["detail"]
    status, body = await get(client, USAGE_PATH)
    assert (status, body) == (403, {"detail": "Enterprise admin API key required"})


@pytest.mark.parametrize(
    "change",
    [
        {"malformed": "negative"},
        {"error_rate": 1.0},
        {"redirect": True},
        {"latency": 30.0},  # would time the request below out if it applied
        {"hang": True},
    ],
    ids=lambda c: next(iter(c)),
)
async def test_every_answering_fault_honours_paths(client: Client, faults: Faults, change: dict[str, object]) -> None:
    faults.update({**change, "paths": ["/v3/enterprise/queue"]})

    async def others() -> list[int]:
        return [(await get(client, path, params))[0] for path, params in ROUTES if path != QUEUE]

    # A latency or hang that applied here would blow the bound; there is no sleeping either way.
    assert set(await asyncio.wait_for(others(), timeout=10)) == {200}
    if "latency" in change or "hang" in change:
        return  # the queue itself would wait: that these faults apply at all is tested in test_simulator
    async with client.get(QUEUE, headers=V3_AUTH, allow_redirects=False) as resp:
        assert resp.status == {"malformed": 200, "error_rate": 500, "redirect": 302}[next(iter(change))]
        if "malformed" in change:
            assert (await resp.json())["queue_size"] == -1


async def test_runaway_cursor_never_ends_a_v3_list(client: Client, faults: Faults) -> None:
    faults.update({"runaway_cursor": True, "paths": ["/nowhere"]})  # not one of the scoped faults
    cursors: list[str] = []
    after: list[tuple[str, str]] = []
    for _ in range(10):
        page = await ok(client, V3_ORGS, [("first", "200"), *after])
        assert page["has_next_page"] is True
        assert isinstance(page["end_cursor"], str)
        cursors.append(page["end_cursor"])
        after = [("after", page["end_cursor"])]
    assert len(set(cursors)) == len(cursors)
    assert page["items"] == []  # past the end, and still "more"
    assert (await ok(client, V3_CYCLES))["has_next_page"] is True


async def test_runaway_cursor_never_ends_a_v2_list(client: Client, faults: Faults) -> None:
    faults.runaway_cursor = True
    skips = []
    skip = 0
    for _ in range(10):
        page = await ok(client, V2_ORGS, [("skip", str(skip))])
        assert page["has_more"] is True
        skips.append(skip)
        skip = page["next_cursor"]
        assert skip > skips[-1]
    assert page["items"] == []


@pytest.mark.parametrize(
    ("change", "mentions"),
    [
        ({"paths": "/v3"}, "paths"),
        ({"paths": ["v3/enterprise"]}, "paths"),
        ({"paths": [3]}, "paths"),
        ({"runaway_cursor": "yes"}, "runaway_cursor"),
    ],
)
async def test_faults_endpoint_validates_the_new_fields(
    client: Client, faults: Faults, change: dict[str, object], mentions: str
) -> None:
    async with client.post("/-/faults", json=change) as resp:
        assert resp.status == 400
        assert mentions in (await resp.json())["detail"]
    assert faults == Faults()
    async with client.post("/-/faults", json={"paths": ["/v3/"], "runaway_cursor": True}) as resp:
        assert resp.status == 200
        assert (await resp.json())["paths"] == ["/v3/"]
    assert (faults.paths, faults.runaway_cursor) == (["/v3/"], True)


async def test_rate_limit_on_v3_is_a_problem_429(client: Client, faults: Faults) -> None:
    faults.rate_limit_per_second = 1.0
    assert (await get(client, QUEUE))[0] == 200
    async with client.get(QUEUE, headers=V3_AUTH) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "1"
        assert_problem(await resp.json(content_type=None), 429, QUEUE)


async def test_v3_requests_are_recorded_with_their_full_query(client: Client, app: web.Application) -> None:
    params = bounds(B - DAY, B, ["org-1", "org-2"], ["u-1"])
    await get(client, PRS, params)
    await get(client, f"{V3_DAILY}/users/u-9", [("time_after", "x")])
    recorded = [(r.path, r.query, r.status) for r in app[REQUESTS_KEY]]
    assert recorded == [
        (
            PRS,
            {"time_after": [str(B - DAY)], "time_before": [str(B)], "org_ids": ["org-1", "org-2"], "user_ids": ["u-1"]},
            200,
        ),
        (f"{V3_DAILY}/users/u-9", {"time_after": ["x"]}, 422),
    ]


# ---------------------------------------------------------------------------------- CLI

REPO_ROOT = Path(__file__).resolve().parents[1]


async def test_simulate_takes_a_v3_token_from_the_environment_and_a_page_size() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "DEVIN_API_KEY": "cog_from_env",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "exporter.simulator", "--listen", "127.0.0.1:0", "--page-size", "4",
        stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=10)).decode()
        match = re.fullmatch(r"simulator listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert match is not None, line
        url = match.group(1)
        async with aiohttp.ClientSession() as session:
            env_token = {"Authorization": "Bearer cog_from_env"}
            async with session.get(url + V3_ORGS, headers=env_token) as resp:
                assert resp.status == 200
                assert len((await resp.json())["items"]) == 4
            async with session.get(url + QUEUE, headers=V3_AUTH) as resp:
                assert resp.status == 401  # the environment's token replaced the default
            async with session.get(url + USAGE_PATH, headers=V2_AUTH) as resp:
                assert resp.status == 200  # a cog_ variable leaves the v2 key at its default
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=5) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["--api-key", "cog_x"], "--v3-token"),
        (["--v3-token", "apk_user_x"], "cog_"),
        (["--page-size", "0"], "integer >= 1"),
    ],
)
def test_simulate_rejects_tokens_of_the_wrong_family(
    argv: list[str], mentions: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert mentions in capsys.readouterr().err
