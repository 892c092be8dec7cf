"""The catalogue over the transport with v3 conventions: bounds, arrays, both paging styles, error bodies, 403s.

HTTP is mocked with aioresponses; each test scripts the replies and looks at what was sent.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

import aiohttp
import pytest
from aioresponses import CallbackResult, aioresponses
from yarl import URL

from exporter import paging
from exporter.catalogue import CATALOGUE
from exporter.catalogue.declare import DeclarationError, Point, Query
from exporter.catalogue.organizations import ORGANIZATIONS, V2_ORGANIZATIONS, V3_CYCLES, V3_ORGANIZATIONS
from exporter.catalogue.usage import USAGE, V3_PRS, V3_SEARCHES, V3_SESSIONS
from exporter.config import COLLECTOR_NAMES, V3_ONLY_COLLECTORS, ApiSettings, OrgSet
from exporter.fetch import call_endpoint, fetch_points
from exporter.secret import ApiKey
from exporter.transport import ApiError, ErrorReason, Transport, new_session

TOKEN: Final = "cog_SECRET_V3_TOKEN_0123456789"
BASE: Final = "https://api.example.test"
END: Final = datetime(2026, 11, 24, 18, 0, 0, 700_000, tzinfo=UTC)
SESSIONS: Final = {
    "sessions_created_count": 10, "sessions_created_with_playbook_count": 2,
    "sessions_created_with_search_count": 3, "sessions_with_merged_prs_count": 4, "avg_acus_per_session": 2.5,
    "sessions_created_by_origin": {"webapp": 6, "slack": 4}, "sessions_created_by_size": {"s": 7, "xl": 3},
    "sessions_with_merged_prs_by_size": {"s": 4},
}
PRS: Final = {"prs_opened_count": 5, "prs_closed_count": 4, "prs_merged_count": 3, "prs_created_count": 6}


@dataclass
class Server:
    """Scripted replies per path, and every request seen (URL, parameters as sent, headers)."""

    replies: dict[str, list[CallbackResult]] = field(default_factory=dict)
    seen: list[tuple[URL, list[tuple[str, str]], dict[str, str]]] = field(default_factory=list)

    def callback(self, url: URL, **kwargs: object) -> CallbackResult:
        params = kwargs["params"]
        headers = kwargs["headers"]
        assert isinstance(params, list) and isinstance(headers, dict)
        self.seen.append((url, list(params), dict(headers)))
        queue = self.replies.get(url.path, [])
        assert queue, f"no reply scripted for {url.path}"
        return queue.pop(0) if len(queue) > 1 else queue[0]

    def params(self, path: str) -> list[list[tuple[str, str]]]:
        return [p for url, p, _ in self.seen if url.path == path]


class _FinishedUpload:
    output_size = 0


class MockResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 vs aiohttp 3.14: see tests/test_client.py."""

    def __init__(self, method: str, url: URL, **kwargs: object) -> None:
        kwargs.setdefault("stream_writer", _FinishedUpload())
        super().__init__(method, url, **kwargs)  # type: ignore[arg-type]


def ok(payload: object) -> CallbackResult:
    return CallbackResult(status=200, payload=payload, response_class=MockResponse)  # type: ignore[arg-type]


def problem(status: int, body: dict[str, object]) -> CallbackResult:
    return CallbackResult(status=status, payload=body, content_type="application/problem+json",
                          response_class=MockResponse)


@dataclass
class Rig:
    server: Server
    transport: Transport

    async def points(self, collector: str, org_set: OrgSet | None, query: Query) -> tuple[Point, ...]:
        decl = {"usage": USAGE, "organizations": ORGANIZATIONS}[collector]
        return await fetch_points(self.transport, decl, "v3", org_set.name if org_set else None, org_set, query)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    server = Server()
    session = new_session()
    settings = ApiSettings(base_url=BASE, api_key=ApiKey(TOKEN), max_requests_per_second=1e6, retries=0)
    try:
        with aioresponses() as mock:
            mock.get(re.compile(r"^https://api\.example\.test/.*$"), callback=server.callback, repeat=True)
            yield Rig(server, Transport(session, settings))
    finally:
        await session.close()


def window(hours: float) -> Query:
    return Query(start=END - timedelta(hours=hours), end=END)


def families(points: tuple[Point, ...]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(p.family, p.labels): p.value for p in points}


# --------------------------------------------------------------------------------------------
# v3 request shape


async def test_v3_bounds_are_whole_unix_seconds_exactly_the_window_apart_and_arrays_repeat(rig: Rig) -> None:
    rig.server.replies = {V3_SESSIONS.path: [ok(SESSIONS)], V3_PRS.path: [ok(PRS)]}
    org_set = OrgSet("oncall", org_ids=("org-b", "org-a"), user_ids=("u-2", "u-1"))
    await rig.points("usage", org_set, Query(org_set.org_ids, org_set.user_ids, END - timedelta(days=7), END))
    (sent,) = rig.server.params(V3_SESSIONS.path)
    before = int(END.timestamp())  # 700 ms cut off, never rounded up into the future
    assert sent == [("time_after", str(before - 7 * 86400)), ("time_before", str(before)),
                    ("org_ids", "org-b"), ("org_ids", "org-a"), ("user_ids", "u-2"), ("user_ids", "u-1")]
    headers = rig.server.seen[0][2]
    assert headers["Authorization"] == f"Bearer {TOKEN}"


async def test_v3_window_starting_on_a_whole_second_sends_that_second_as_time_after(rig: Rig) -> None:
    # A billing_cycle or today window: [cycle start or midnight, now], now 700 ms past a second.
    # Rounding the length instead of cutting each bound used to send the start one second early.
    rig.server.replies = {V3_SESSIONS.path: [ok(SESSIONS)], V3_PRS.path: [ok(PRS)],
                          V3_SEARCHES.path: [ok({"searches_created_count": 9})]}
    cycle_start = datetime(2026, 11, 5, 8, 0, 0, tzinfo=UTC)
    await rig.points("usage", OrgSet("all"), Query(start=cycle_start, end=END))
    (sent,) = rig.server.params(V3_SESSIONS.path)
    assert sent == [("time_after", str(int(cycle_start.timestamp()))), ("time_before", str(int(END.timestamp())))]


async def test_v3_usage_is_three_calls_and_a_set_with_user_ids_gets_no_searches(rig: Rig) -> None:
    rig.server.replies = {V3_SESSIONS.path: [ok(SESSIONS)], V3_PRS.path: [ok(PRS)],
                          V3_SEARCHES.path: [ok({"searches_created_count": 9})]}
    whole = await rig.points("usage", OrgSet("all"), window(24))
    values = families(whole)
    assert values[("devin_usage_sessions", ())] == 10
    assert values[("devin_usage_searches", ())] == 9
    assert values[("devin_usage_prs_created", ())] == 6
    assert values[("devin_usage_acus_per_session", ())] == 2.5
    assert values[("devin_usage_sessions_by_origin", (("origin", "slack"),))] == 4
    assert values[("devin_usage_sessions_by_size", (("size", "xl"),))] == 3
    assert sorted(url.path for url, _, _ in rig.server.seen) == sorted(
        [V3_SESSIONS.path, V3_PRS.path, V3_SEARCHES.path])

    rig.server.seen.clear()
    users = OrgSet("oncall", user_ids=("u-1",))
    filtered = await rig.points("usage", users, Query(user_ids=("u-1",), start=END - timedelta(hours=1), end=END))
    assert not any(p.family == "devin_usage_searches" for p in filtered)
    assert V3_SEARCHES.path not in [url.path for url, _, _ in rig.server.seen]
    assert USAGE.unpublished("v3", users) == ("devin_usage_searches",)


async def test_a_failing_call_fails_the_whole_poll(rig: Rig) -> None:
    rig.server.replies = {V3_SESSIONS.path: [ok(SESSIONS)], V3_PRS.path: [ok({**PRS, "prs_merged_count": -1})],
                          V3_SEARCHES.path: [ok({"searches_created_count": 9})]}
    with pytest.raises(ApiError) as caught:
        await rig.points("usage", OrgSet("all"), window(24))
    assert caught.value.reason is ErrorReason.INVALID_RESPONSE
    assert "prs_merged_count" in caught.value.message


# --------------------------------------------------------------------------------------------
# Error bodies and permissions


async def test_problem_json_detail_and_field_errors_are_in_the_message(rig: Rig) -> None:
    rig.server.replies = {V3_SEARCHES.path: [problem(422, {
        "type": "about:blank", "title": "Unprocessable Entity", "status": 422,
        "detail": "Request validation failed", "instance": None,
        "errors": [{"loc": ["query", "time_after"], "msg": "Field required", "type": "missing"}]})]}
    with pytest.raises(ApiError) as caught:
        await call_endpoint(rig.transport, USAGE, V3_SEARCHES, "all", window(1))
    assert caught.value.reason is ErrorReason.CLIENT_ERROR
    assert "Request validation failed" in caught.value.message
    assert "time_after: Field required" in caught.value.message


async def test_a_v3_403_names_the_collector_and_the_permission_it_needs_and_is_not_retried(rig: Rig) -> None:
    rig.server.replies = {V3_ORGANIZATIONS.path: [problem(403, {"title": "Forbidden", "status": 403,
                                                               "detail": "Insufficient permissions"})]}
    with pytest.raises(ApiError) as caught:
        await call_endpoint(rig.transport, ORGANIZATIONS, V3_ORGANIZATIONS, None, Query(end=END))
    message = caught.value.message
    assert caught.value.reason is ErrorReason.AUTH
    assert "collector organizations" in message and "ManageOrganizations" in message
    assert "Insufficient permissions" in message
    assert TOKEN not in message
    assert len(rig.server.seen) == 1


# --------------------------------------------------------------------------------------------
# Paging


def org(i: int) -> dict[str, object]:
    return {"org_id": f"org-{i}", "name": f"Org {i}", "created_at": 1, "updated_at": 2,
            "max_cycle_acu_limit": 100 * i if i % 2 else None, "max_session_acu_limit": None}


async def test_cursor_paging_follows_end_cursor_until_has_next_page_is_false(rig: Rig) -> None:
    rig.server.replies = {V3_ORGANIZATIONS.path: [
        ok({"items": [org(1), org(2)], "has_next_page": True, "end_cursor": "c1", "total": 5}),
        ok({"items": [org(3), org(4)], "has_next_page": True, "end_cursor": "c2", "total": None}),
        ok({"items": [org(5)], "has_next_page": False, "end_cursor": None}),
    ]}
    points = await call_endpoint(rig.transport, ORGANIZATIONS, V3_ORGANIZATIONS, None, Query(end=END))
    names = [dict(p.labels)["org_name"] for p in points if p.family == "devin_organization_info"]
    assert names == [f"Org {i}" for i in range(1, 6)]
    limits = {dict(p.labels)["org_id"]: p.value for p in points if p.family == "devin_organization_acu_cycle_limit"}
    assert limits == {"org-1": 100, "org-3": 300, "org-5": 500}  # null limits publish nothing
    pages = rig.server.params(V3_ORGANIZATIONS.path)
    assert pages == [[("first", "200")], [("first", "200"), ("after", "c1")], [("first", "200"), ("after", "c2")]]


async def test_skip_limit_paging_moves_by_what_each_page_holds(rig: Rig) -> None:
    def v2_org(i: int) -> dict[str, object]:
        return {"org_id": f"org-{i}", "org_name": f"Org {i}", "created_at": "2026-01-01T00:00:00Z",
                "max_cycle_acu_limit": None, "max_session_acu_limit": 50, "org_member_count": 3}
    rig.server.replies = {V2_ORGANIZATIONS.path: [
        # Pages smaller than asked for: the next skip is what the server says, else skip + items.
        ok({"items": [v2_org(1), v2_org(2)], "total": 5, "skip": 0, "limit": 2, "has_more": True, "next_cursor": 2}),
        ok({"items": [v2_org(3), v2_org(4)], "total": 5, "skip": 2, "limit": 2, "has_more": True,
            "next_cursor": None}),
        ok({"items": [v2_org(5)], "total": 5, "skip": 4, "limit": 2, "has_more": False, "next_cursor": None}),
    ]}
    points = await call_endpoint(rig.transport, ORGANIZATIONS, V2_ORGANIZATIONS, None, Query(end=END))
    assert len([p for p in points if p.family == "devin_organization_info"]) == 5
    skips = [dict(p)["skip"] for p in rig.server.params(V2_ORGANIZATIONS.path)]
    assert skips == ["0", "2", "4"]
    assert all(dict(p)["limit"] == "200" for p in rig.server.params(V2_ORGANIZATIONS.path))


@pytest.mark.parametrize("endless", [
    lambda n: {"items": [], "has_next_page": True, "end_cursor": "same"},  # a cursor that comes back
    lambda n: {"items": [org(n)], "has_next_page": True, "end_cursor": f"c{n}"},  # one that never ends
], ids=["repeated", "endless"])
async def test_a_runaway_cursor_is_an_invalid_response_not_an_endless_loop(
        rig: Rig, monkeypatch: pytest.MonkeyPatch, endless: Callable[[int], dict[str, object]]) -> None:
    monkeypatch.setattr(paging, "MAX_PAGES", 20)
    rig.server.replies = {V3_ORGANIZATIONS.path: [ok(endless(n)) for n in range(40)]}
    with pytest.raises(ApiError) as caught:
        await call_endpoint(rig.transport, ORGANIZATIONS, V3_ORGANIZATIONS, None, Query(end=END))
    assert caught.value.reason is ErrorReason.INVALID_RESPONSE
    assert "does not end" in caught.value.message
    assert len(rig.server.seen) <= 20


async def test_has_next_page_without_a_cursor_is_an_invalid_response(rig: Rig) -> None:
    rig.server.replies = {V3_ORGANIZATIONS.path: [ok({"items": [org(1)], "has_next_page": True,
                                                      "end_cursor": None})]}
    with pytest.raises(ApiError) as caught:
        await call_endpoint(rig.transport, ORGANIZATIONS, V3_ORGANIZATIONS, None, Query(end=END))
    assert caught.value.reason is ErrorReason.INVALID_RESPONSE


async def test_the_current_cycle_is_the_one_holding_now(rig: Rig) -> None:
    start = int((END - timedelta(days=3)).timestamp())
    cycles = [{"after": start - 30 * 86400, "before": start}, {"after": start, "before": start + 30 * 86400}]
    rig.server.replies = {V3_CYCLES.path: [ok({"items": cycles, "has_next_page": False, "end_cursor": None})]}
    points = await call_endpoint(rig.transport, ORGANIZATIONS, V3_CYCLES, None, Query(end=END))
    assert families(tuple(points)) == {("devin_billing_cycle_start_timestamp_seconds", ()): start,
                                       ("devin_billing_cycle_end_timestamp_seconds", ()): start + 30 * 86400}


# --------------------------------------------------------------------------------------------
# Declarations


def test_a_point_that_does_not_fit_its_family_is_loud() -> None:
    with pytest.raises(DeclarationError):
        USAGE.check([Point("devin_usage_sessions", 1, (("origin", "x"),))])
    with pytest.raises(DeclarationError):
        ORGANIZATIONS.check([Point("devin_nonexistent", 1)])
    USAGE.check([Point("devin_usage_some_extra_field", 1)])  # v2 extras are declared by prefix


def test_the_config_calls_v3_only_exactly_the_collectors_the_catalogue_declares_no_v2_calls_for() -> None:
    # The config (which may not import the catalogue) keeps its own list for its v2 rules.
    assert {c.name for c in CATALOGUE if "v2" not in c.calls} == V3_ONLY_COLLECTORS
    assert {c.name for c in CATALOGUE} == set(COLLECTOR_NAMES)
