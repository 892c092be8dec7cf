"""The API simulator's v3 routes and what they share with v2, over real loopback sockets."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from exporter.simulator import (
    DEFAULT_DEMO_KEY,
    DEFAULT_ORGANIZATIONS,
    DEFAULT_V3_TOKEN,
    ENTERPRISE_ORG_IDS,
    ORGANIZATIONS_KEY,
    USAGE_FIELDS,
    USAGE_PATH,
    Faults,
    Organization,
    create_app,
    expected_organizations_v2,
    expected_organizations_v3,
    expected_queue,
    expected_usage,
)

NOW = datetime(2026, 11, 24, 18, 7, 30, tzinfo=UTC)
V2_AUTH = {"Authorization": f"Bearer {DEFAULT_DEMO_KEY}"}
V3_AUTH = {"Authorization": f"Bearer {DEFAULT_V3_TOKEN}"}
QUEUE = "/v3/enterprise/queue"
V2_ORGS = "/v2/enterprise/organizations"
V3_ORGS = "/v3/enterprise/organizations"

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
