"""The API simulator's v3 routes and what they share with v2, over real loopback sockets."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from exporter.simulator import (
    DEFAULT_DEMO_KEY,
    DEFAULT_V3_TOKEN,
    USAGE_PATH,
    Faults,
    create_app,
    expected_queue,
)

NOW = datetime(2026, 11, 24, 18, 7, 30, tzinfo=UTC)
V2_AUTH = {"Authorization": f"Bearer {DEFAULT_DEMO_KEY}"}
V3_AUTH = {"Authorization": f"Bearer {DEFAULT_V3_TOKEN}"}
QUEUE = "/v3/enterprise/queue"

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]
Params = Sequence[tuple[str, str]]


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


async def ok(client: Client, path: str, params: Params = ()) -> dict[str, object]:
    status, body = await get(client, path, params)
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def assert_problem(body: object, status: int, path: str) -> dict[str, object]:
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
