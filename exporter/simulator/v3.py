"""API v3 routes (`cog_` service-user tokens): parameters as FastAPI reads them, replies per the v3 docs."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Final

from exporter.simulator.model import (
    ENTERPRISE_ORG_IDS,
    EPOCH,
    ORIGINS,
    PRODUCTS,
    SIZES,
    Activity,
    Organization,
    active_users,
    activity,
    acus,
    as_utc,
    billing_cycle,
    billing_cycles,
    consumption,
    created_at,
    queue_size,
    scope,
    updated_at,
    window,
)
from exporter.simulator.query import QueryReader, validation_error
from exporter.simulator.route import Call, Invalid, JSONPath, JSONValue, NotFound, Reply, Route

__all__ = [
    "ACTIVE_USERS_PATH",
    "CYCLES_PATH",
    "DAILY_PATH",
    "ORGANIZATIONS_PATH",
    "ORG_DAILY_PATH",
    "PRS_PATH",
    "QUEUE_PATH",
    "ROUTES",
    "SEARCHES_PATH",
    "SESSIONS_PATH",
    "USAGE_PATH",
    "USER_DAILY_PATH",
    "expected_active_users",
    "expected_consumption_v3",
    "expected_cycles_v3",
    "expected_organizations_v3",
    "expected_prs",
    "expected_queue",
    "expected_searches",
    "expected_sessions",
    "expected_usage_v3",
    "permission",
    "unix",
]

SESSIONS_PATH: Final = "/v3/enterprise/metrics/sessions"
PRS_PATH: Final = "/v3/enterprise/metrics/prs"
SEARCHES_PATH: Final = "/v3/enterprise/metrics/searches"
ACTIVE_USERS_PATH: Final = "/v3/enterprise/metrics/active-users"
USAGE_PATH: Final = "/v3/enterprise/metrics/usage"
QUEUE_PATH: Final = "/v3/enterprise/queue"
CYCLES_PATH: Final = "/v3/enterprise/consumption/cycles"
DAILY_PATH: Final = "/v3/enterprise/consumption/daily"
ORG_DAILY_PATH: Final = DAILY_PATH + "/organizations/{org_id}"
USER_DAILY_PATH: Final = DAILY_PATH + "/users/{user_id}"
ORGANIZATIONS_PATH: Final = "/v3/enterprise/organizations"

# The permission a service user needs per path prefix (newer docs' names), for 403 details.
_PERMISSIONS: Final = (
    ("/v3/enterprise/metrics", "ViewAccountMetrics"),
    ("/v3/enterprise/queue", "ViewAccountMetrics"),
    ("/v3/enterprise/consumption", "ViewAccountConsumption"),
    ("/v3/enterprise/organizations", "ManageOrganizations"),
)


def permission(path: str) -> str | None:
    """The permission the docs say this path needs, if it is one of the simulated ones."""
    return next((name for prefix, name in _PERMISSIONS if path.startswith(prefix)), None)


def unix(t: datetime) -> int:
    """An instant as v3 writes it: whole Unix seconds."""
    return int(t.timestamp())


# --------------------------------------------------------------------------------------------
# Time bounds: integer Unix seconds
# --------------------------------------------------------------------------------------------

_MIN_SECONDS: Final = -62135596800  # 0001-01-01T00:00:00Z: what a datetime can hold
_MAX_SECONDS: Final = 253402300799  # 9999-12-31T23:59:59Z


def _instant(seconds: int) -> datetime:
    return EPOCH + timedelta(seconds=min(max(seconds, _MIN_SECONDS), _MAX_SECONDS))


def _bounds(after: int | None, before: int | None, now: datetime) -> tuple[datetime, datetime]:
    """The window [time_after, time_before] means at `now`, clipped to now.

    A missing `time_after` is the current billing cycle's start and a missing `time_before` is now
    (the docs state no default; v2's is the billing cycle). A lone bound beyond the other's default
    gives an empty window. Raises ValueError if both are given and after > before.
    """
    if after is not None and before is not None and after > before:
        raise ValueError("time_after must not be after time_before")
    start = None if after is None else _instant(after)
    end = None if before is None else _instant(before)
    if start is not None and end is None:
        end = max(start, as_utc(now))
    if end is not None and start is None:
        start = min(end, billing_cycle(now)[0])
    return window(start, end, now)


def _required_bounds(reader: QueryReader) -> tuple[int, int]:
    """`time_after` and `time_before` of a metrics route, both required (see `_check`)."""
    return reader.integer("time_after", None), reader.integer("time_before", None)


def _optional_bounds(reader: QueryReader) -> tuple[int | None, int | None]:
    """`time_after` and `time_before` where either may be left out (see `_check`)."""
    return reader.optional_integer("time_after"), reader.optional_integer("time_before")


def _check(reader: QueryReader, after: int | None, before: int | None) -> None:
    """Raise Invalid for every bad parameter read, else for time_after > time_before."""
    reader.check()
    if after is not None and before is not None and after > before:
        message = "Value error, time_after must not be after time_before"
        raw = reader.last("time_after")
        raise Invalid([validation_error("value_error", "time_after", message, raw, {"error": {}})])


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _activity(
    org_ids: Sequence[str], user_ids: Sequence[str], after: int, before: int, now: datetime, enterprise: Sequence[str]
) -> Activity:
    start, end = _bounds(after, before, now)
    return activity(scope(org_ids, enterprise), user_ids, start, end)


def expected_sessions(
    org_ids: Sequence[str],
    user_ids: Sequence[str],
    after: int,
    before: int,
    *,
    now: datetime,
    enterprise_org_ids: Sequence[str] = ENTERPRISE_ORG_IDS,
) -> dict[str, JSONValue]:
    """The SessionMetrics GET /v3/enterprise/metrics/sessions returns for this query at `now`.

    `sessions_created_count` equals v2 usage's `sessions_count` for the same bounds and filters;
    the playbook, search and merged-PR counts never exceed it; `sessions_created_by_origin` and
    `sessions_created_by_size` each sum to it, `sessions_with_merged_prs_by_size` to
    `sessions_with_merged_prs_count`; `avg_acus_per_session` is the Devin ACUs those sessions used
    (what consumption reports for the same orgs and bounds) over their count, 0.0 without sessions.
    Bounds are Unix seconds, clipped to `now`; no `org_ids` is `enterprise_org_ids`.
    """
    done = _activity(org_ids, user_ids, after, before, now, enterprise_org_ids)
    return {
        "sessions_created_count": done.sessions,
        "sessions_created_with_playbook_count": done.sessions_with_playbook,
        "sessions_created_with_search_count": done.sessions_with_search,
        "sessions_with_merged_prs_count": done.sessions_with_merged_prs,
        "avg_acus_per_session": acus(done.devin_hundredths) / done.sessions if done.sessions else 0.0,
        "sessions_created_by_origin": dict[str, JSONValue](zip(ORIGINS, done.by_origin, strict=True)),
        "sessions_created_by_size": dict[str, JSONValue](zip(SIZES, done.by_size, strict=True)),
        "sessions_with_merged_prs_by_size": dict[str, JSONValue](zip(SIZES, done.merged_by_size, strict=True)),
    }


def expected_prs(
    org_ids: Sequence[str],
    user_ids: Sequence[str],
    after: int,
    before: int,
    *,
    now: datetime,
    enterprise_org_ids: Sequence[str] = ENTERPRISE_ORG_IDS,
) -> dict[str, JSONValue]:
    """The body of GET /v3/enterprise/metrics/prs for this query at `now`.

    Opened, closed and merged equal v2 usage's `prs_opened`, `prs_closed`, `prs_merged` for the
    same bounds and filters, so merged <= closed <= opened. `prs_created_count` counts every PR a
    session created, drafts that were never opened for review included, so it is >= opened.
    """
    done = _activity(org_ids, user_ids, after, before, now, enterprise_org_ids)
    return {
        "prs_opened_count": done.prs_opened,
        "prs_closed_count": done.prs_closed,
        "prs_merged_count": done.prs_merged,
        "prs_created_count": done.prs_created,
    }


def expected_searches(
    org_ids: Sequence[str],
    after: int,
    before: int,
    *,
    now: datetime,
    enterprise_org_ids: Sequence[str] = ENTERPRISE_ORG_IDS,
) -> dict[str, JSONValue]:
    """The body of GET /v3/enterprise/metrics/searches: v2 usage's `searches_count` for these orgs.

    The route takes no `user_ids` (a `user_ids` parameter is ignored, as FastAPI ignores unknown
    parameters), so neither does this.
    """
    done = _activity(org_ids, (), after, before, now, enterprise_org_ids)
    return {"searches_created_count": done.searches}


def expected_active_users(
    org_ids: Sequence[str],
    after: int,
    before: int,
    *,
    now: datetime,
    min_sessions: int = 1,
    min_searches: int = 1,
    enterprise_org_ids: Sequence[str] = ENTERPRISE_ORG_IDS,
) -> dict[str, JSONValue]:
    """The body of GET /v3/enterprise/metrics/active-users: users with at least `min_sessions`
    sessions or at least `min_searches` searches in the window (clipped to `now`).

    `start_time` / `end_time` echo the bounds asked for. The count grows sub-linearly with the
    window's length, never exceeds the orgs' users (<= their `org_member_count`), falls as either
    minimum rises (a minimum of 0 counts every user), and a superset of orgs never has fewer.
    """
    start, end = _bounds(after, before, now)
    count = active_users(
        scope(org_ids, enterprise_org_ids), start, end, min_sessions=min_sessions, min_searches=min_searches
    )
    return {"active_users": count, "start_time": after, "end_time": before}


def expected_usage_v3(
    after: int | None, before: int | None, *, now: datetime, enterprise_org_ids: Sequence[str] = ENTERPRISE_ORG_IDS
) -> dict[str, JSONValue]:
    """The body of GET /v3/enterprise/metrics/usage: the whole enterprise (the route has no filters).

    Missing bounds default as on consumption (the current billing cycle so far). The counts are
    those of v2 usage and of the sessions, searches and PRs routes for the same bounds.
    """
    start, end = _bounds(after, before, now)
    done = activity(scope((), enterprise_org_ids), (), start, end)
    return {
        "sessions_count": done.sessions,
        "searches_count": done.searches,
        "prs_created_count": done.prs_created,
        "prs_merged_count": done.prs_merged,
    }


def _filters(call: Call, *, users: bool) -> tuple[list[str], list[str], int, int]:
    """The bounds and filters of the sessions, PRs and searches routes, in FastAPI's order."""
    reader = QueryReader(call.query)
    after, before = _required_bounds(reader)
    org_ids = reader.strings("org_ids")
    user_ids = reader.strings("user_ids") if users else []
    _check(reader, after, before)
    return org_ids, user_ids, after, before


def _sessions(call: Call) -> Reply:
    org_ids, user_ids, after, before = _filters(call, users=True)
    body = expected_sessions(org_ids, user_ids, after, before, now=call.now, enterprise_org_ids=call.enterprise_org_ids)
    return Reply(body, lead=("sessions_created_count",), required=("sessions_created_count",))


def _prs(call: Call) -> Reply:
    org_ids, user_ids, after, before = _filters(call, users=True)
    body = expected_prs(org_ids, user_ids, after, before, now=call.now, enterprise_org_ids=call.enterprise_org_ids)
    return Reply(body, lead=("prs_opened_count",), required=("prs_merged_count",))


def _searches(call: Call) -> Reply:
    org_ids, _, after, before = _filters(call, users=False)
    body = expected_searches(org_ids, after, before, now=call.now, enterprise_org_ids=call.enterprise_org_ids)
    return Reply(body, lead=("searches_created_count",), required=("searches_created_count",))


def _active_users(call: Call) -> Reply:
    reader = QueryReader(call.query)
    after, before = _required_bounds(reader)
    org_ids = reader.strings("org_ids")
    min_sessions = reader.integer("min_sessions", 1, ge=0)
    min_searches = reader.integer("min_searches", 1, ge=0)
    _check(reader, after, before)
    body = expected_active_users(
        org_ids,
        after,
        before,
        now=call.now,
        min_sessions=min_sessions,
        min_searches=min_searches,
        enterprise_org_ids=call.enterprise_org_ids,
    )
    return Reply(body, lead=("active_users",), required=("active_users",))


def _usage(call: Call) -> Reply:
    reader = QueryReader(call.query)
    after, before = _optional_bounds(reader)
    _check(reader, after, before)
    body = expected_usage_v3(after, before, now=call.now, enterprise_org_ids=call.enterprise_org_ids)
    return Reply(body, lead=("sessions_count",), required=("prs_merged_count",))


# --------------------------------------------------------------------------------------------
# The queue
# --------------------------------------------------------------------------------------------


def _queue_status(size: int) -> str:
    """The docs' thresholds: normal up to 10 queued sessions, elevated up to 50, high beyond."""
    return "normal" if size <= 10 else "elevated" if size <= 50 else "high"


def expected_queue(now: datetime) -> dict[str, JSONValue]:
    """The body of GET /v3/enterprise/queue at `now`: {queue_size, status}."""
    size = queue_size(now)
    return {"queue_size": size, "status": _queue_status(size)}


def _queue(call: Call) -> Reply:
    return Reply(expected_queue(call.now), lead=("queue_size",), required=("status",))


# --------------------------------------------------------------------------------------------
# Lists: cursor paging
# --------------------------------------------------------------------------------------------

_CURSOR_RE: Final = re.compile(r"offset:(\d{1,9})", re.ASCII)


def _cursor(offset: int) -> str:
    """An opaque cursor: the next item's offset, base64url so clients cannot read it at a glance."""
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode().rstrip("=")


def _offset(cursor: str) -> int | None:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    match = _CURSOR_RE.fullmatch(text)
    return None if match is None else int(match.group(1))


def _page(call: Call, items: Sequence[JSONValue], lead: JSONPath, required: JSONPath) -> Reply:
    """One page of a v3 list: `first` (1-200, default 100) items after the cursor `after`, at most
    `call.page_size` of them; `end_cursor` is null on the last page."""
    reader = QueryReader(call.query)
    first = reader.integer("first", 100, ge=1, le=200)
    after = reader.last("after")
    offset = 0 if after is None else _offset(after)
    if offset is None:
        reader.errors.append(validation_error("value_error", "after", "Value error, not a cursor of this list", after))
        offset = 0
    reader.check()
    size = min(first, call.page_size)
    page = list(items[offset : offset + size])
    has_next = call.runaway_cursor or offset + len(page) < len(items)
    # A runaway list steps on past its end, so every cursor is a new one.
    end = offset + size if call.runaway_cursor else offset + len(page)
    body: dict[str, JSONValue] = {
        "items": page,
        "has_next_page": has_next,
        "end_cursor": _cursor(end) if has_next else None,
        "total": len(items),
    }
    if not page:
        return Reply(body, lead=("total",), required=("items",))
    return Reply(body, lead=("items", 0, *lead), required=("items", 0, *required))


def expected_organizations_v3(organizations: Sequence[Organization]) -> list[JSONValue]:
    """Every item GET /v3/enterprise/organizations lists for these organizations, all pages in order."""
    return [
        {
            "org_id": org.org_id,
            "name": org.name,
            "created_at": unix(created_at(org)),
            "updated_at": unix(updated_at(org)),
            "max_cycle_acu_limit": org.max_cycle_acu_limit,
            "max_session_acu_limit": org.max_session_acu_limit,
        }
        for org in organizations
    ]


def _organizations(call: Call) -> Reply:
    return _page(call, expected_organizations_v3(call.organizations), ("max_cycle_acu_limit",), ("org_id",))


# --------------------------------------------------------------------------------------------
# Billing cycles and consumption
# --------------------------------------------------------------------------------------------


def expected_cycles_v3(now: datetime) -> list[JSONValue]:
    """Every item GET /v3/enterprise/consumption/cycles lists at `now`, all pages in order:
    {after, before} in Unix seconds, from the enterprise's first cycle to the current one."""
    return [{"after": unix(start), "before": unix(end)} for start, end in billing_cycles(now)]


def _cycles(call: Call) -> Reply:
    return _page(call, expected_cycles_v3(call.now), ("after",), ("before",))


def expected_consumption_v3(
    after: int | None,
    before: int | None,
    *,
    now: datetime,
    org_id: str | None = None,
    user_id: str | None = None,
    enterprise_org_ids: Sequence[str] = ENTERPRISE_ORG_IDS,
) -> dict[str, JSONValue]:
    """The ConsumptionResponse of GET /v3/enterprise/consumption/daily, of .../organizations/{org_id}
    (`org_id`) or of .../users/{user_id} (`user_id`) at `now`.

    Missing bounds are the current billing cycle so far. The enterprise's ACUs are every listed
    org's Devin ACUs plus the Cascade, Terminal and review ACUs no org owns; an org's reply and a
    user's (a stable share of each org's) carry Devin ACUs only, the other products 0.0. One
    `consumption_by_date` entry per billing day the window touches, `date` the Unix second the
    day starts (08:00 UTC), holding the part of the day inside the window; products sum to their
    day's `acus` and days to `total_acus`, exactly (in hundredths). Raises ValueError if both
    `org_id` and `user_id` are given, or after > before.
    """
    if org_id is not None and user_id is not None:
        raise ValueError("give org_id or user_id, not both")
    start, end = _bounds(after, before, now)
    orgs = scope([] if org_id is None else [org_id], enterprise_org_ids)
    spent = consumption(orgs, start, end, user_id=user_id, unowned=org_id is None and user_id is None)
    return {
        "total_acus": acus(spent.total),
        "consumption_by_date": [
            {
                "date": unix(day),
                "acus": acus(sum(products)),
                "acus_by_product": {product: acus(part) for product, part in zip(PRODUCTS, products, strict=True)},
            }
            for day, products in spent.days
        ],
    }


def _daily(call: Call) -> Reply:
    reader = QueryReader(call.query)
    after, before = _optional_bounds(reader)
    _check(reader, after, before)
    org_id = call.params.get("org_id")
    if org_id is not None and org_id not in call.enterprise_org_ids:
        raise NotFound(f"Organization {org_id} not found")
    body = expected_consumption_v3(
        after,
        before,
        now=call.now,
        org_id=org_id,
        user_id=call.params.get("user_id"),
        enterprise_org_ids=call.enterprise_org_ids,
    )
    return Reply(body, lead=("total_acus",), required=("total_acus",))


ROUTES: Final = (
    Route(SESSIONS_PATH, _sessions),
    Route(PRS_PATH, _prs),
    Route(SEARCHES_PATH, _searches),
    Route(ACTIVE_USERS_PATH, _active_users),
    Route(USAGE_PATH, _usage),
    Route(QUEUE_PATH, _queue),
    Route(CYCLES_PATH, _cycles),
    Route(DAILY_PATH, _daily),
    Route(ORG_DAILY_PATH, _daily),
    Route(USER_DAILY_PATH, _daily),
    Route(ORGANIZATIONS_PATH, _organizations),
)
