"""API v2 routes (legacy; `apk_` keys): parameters as FastAPI reads them, and replies per the v2 docs."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Final

from exporter.simulator.model import (
    ENTERPRISE_ORG_IDS,
    ENTERPRISE_USER_IDS,
    Organization,
    activity,
    acus,
    billing_cycles,
    consumption,
    created_at,
    membership,
    scope,
    window,
)
from exporter.simulator.query import QueryReader, validation_error
from exporter.simulator.route import Call, Invalid, JSONPath, JSONValue, Reply, Route

__all__ = [
    "CYCLES_PATH",
    "DAILY_PATH",
    "ORGANIZATIONS_PATH",
    "ROUTES",
    "USAGE_FIELDS",
    "USAGE_PATH",
    "USER_DAILY_PATH",
    "expected_consumption_v2",
    "expected_cycles_v2",
    "expected_organizations_v2",
    "expected_usage",
    "rfc3339",
]

USAGE_PATH: Final = "/v2/enterprise/metrics/usage"
ORGANIZATIONS_PATH: Final = "/v2/enterprise/organizations"
CYCLES_PATH: Final = "/v2/enterprise/consumption/cycles"
DAILY_PATH: Final = "/v2/enterprise/consumption/daily"
USER_DAILY_PATH: Final = DAILY_PATH + "/{user_id}"
USAGE_FIELDS: Final = ("sessions_count", "searches_count", "prs_opened", "prs_closed", "prs_merged")


def expected_usage(
    org_ids: Sequence[str],
    user_ids: Sequence[str],
    start: datetime | None,
    end: datetime | None,
    *,
    now: datetime,
    enterprise_org_ids: Sequence[str] = ENTERPRISE_ORG_IDS,
) -> dict[str, int]:
    """The exact counts GET /v2/enterprise/metrics/usage returns for this query at time `now`.

    A missing `start` is the start of `now`'s billing cycle (the 5th of the month at 08:00 UTC,
    see `billing_cycle`), a missing `end` is `now`; together that is the cycle so far. Nothing has
    happened after `now`, so the window is clipped to it. Raises ValueError if start > end.

    No `org_ids` means the whole enterprise: `enterprise_org_ids`, the ids of the organizations
    the app lists (the default ones unless a test changed them).
    """
    start, end = window(start, end, now)
    done = activity(scope(org_ids, enterprise_org_ids), user_ids, start, end)
    return {
        "sessions_count": done.sessions,
        "searches_count": done.searches,
        "prs_opened": done.prs_opened,
        "prs_closed": done.prs_closed,
        "prs_merged": done.prs_merged,
    }


def _read_window(reader: QueryReader) -> tuple[datetime | None, datetime | None]:
    """The (start, end) the query asks for; raises Invalid with FastAPI-shaped errors."""
    names = ("start_date", "end_date", "start", "end")  # FastAPI's declaration order
    parsed = {name: reader.date_time(name) for name in names}
    given = [name for name in names if reader.last(name) is not None]
    # The documented names win over the aliases when both are sent.
    start_name = next((n for n in ("start_date", "start") if n in given), None)
    end_name = next((n for n in ("end_date", "end") if n in given), None)
    # The real API's behaviour with only one bound is undocumented. The exporter always sends
    # both or neither, so the simulator is stricter than upstream here: a half-built window is a
    # bug in the exporter, and failing loudly catches it.
    if (start_name is None) != (end_name is None):
        missing = "start_date" if start_name is None else "end_date"
        reader.errors.append(validation_error("missing", missing, "Field required", None))
    reader.check()
    if start_name is None or end_name is None:
        return None, None
    start, end = parsed[start_name], parsed[end_name]
    assert start is not None and end is not None  # given and without errors
    if start > end:
        message = f"Value error, {start_name} must not be after {end_name}"
        # FastAPI serialises the ValueError in ctx as an empty object.
        error = validation_error("value_error", start_name, message, reader.last(start_name), {"error": {}})
        raise Invalid([error])
    return start, end


def _usage(call: Call) -> Reply:
    start, end = _read_window(QueryReader(call.query))
    # An end in the future is accepted and counts stop at "now": a clock-skewed exporter
    # should see plausible numbers, not an error upstream never documented.
    counts = expected_usage(
        call.query.get("org_ids", ()),
        call.query.get("user_ids", ()),
        start,
        end,
        now=call.now,
        enterprise_org_ids=call.enterprise_org_ids,
    )
    return Reply(dict[str, JSONValue](counts), lead=("sessions_count",), required=("prs_merged",))


def rfc3339(t: datetime) -> str:
    """A UTC instant as v2 writes date-times: `2026-11-24T18:00:00Z`."""
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _page(call: Call, items: Sequence[JSONValue], lead: JSONPath, required: JSONPath) -> Reply:
    """One page of a v2 list: `skip` (>= 0) and `limit` (1-200), at most `call.page_size` items.

    The envelope echoes the `limit` asked for, so a client that steps by it instead of by
    `next_cursor` skips items, as it would upstream when a page comes back short.
    """
    reader = QueryReader(call.query)
    skip = reader.integer("skip", 0, ge=0)
    limit = reader.integer("limit", 100, ge=1, le=200)
    reader.check()
    size = min(limit, call.page_size)
    page = list(items[skip : skip + size])
    has_more = call.runaway_cursor or skip + len(page) < len(items)
    body: dict[str, JSONValue] = {
        "items": page,
        "total": len(items),
        "skip": skip,
        "limit": limit,
        "has_more": has_more,
        # A runaway list steps on past its end, so the next request is never the same one.
        "next_cursor": (skip + size if call.runaway_cursor else skip + len(page)) if has_more else None,
    }
    if not page:
        return Reply(body, lead=("total",), required=("items",))
    return Reply(body, lead=("items", 0, *lead), required=("items", 0, *required))


def expected_organizations_v2(organizations: Sequence[Organization]) -> list[JSONValue]:
    """Every item GET /v2/enterprise/organizations lists for these organizations, all pages in order.

    `org_admin_count` <= `org_member_count`, and `org_user_count` (members who have used Devin)
    <= `org_member_count`; the counts are stable per org id.
    """
    items: list[JSONValue] = []
    for org in organizations:
        heads = membership(org.org_id)
        items.append(
            {
                "org_id": org.org_id,
                "org_name": org.name,
                "created_at": rfc3339(created_at(org)),
                "max_cycle_acu_limit": org.max_cycle_acu_limit,
                "max_session_acu_limit": org.max_session_acu_limit,
                "org_admin_count": heads.admins,
                "org_member_count": heads.members,
                "org_user_count": heads.users,
            }
        )
    return items


def _organizations(call: Call) -> Reply:
    return _page(call, expected_organizations_v2(call.organizations), ("max_cycle_acu_limit",), ("org_id",))


def expected_cycles_v2(now: datetime) -> list[JSONValue]:
    """The body of GET /v2/enterprise/consumption/cycles at `now`: a bare array of {start, end},
    every monthly cycle from the enterprise's first (INCEPTION) to the current one, oldest first;
    the last one's `end` is still ahead."""
    return [{"start": rfc3339(start), "end": rfc3339(end)} for start, end in billing_cycles(now)]


def _cycles(call: Call) -> Reply:
    body = expected_cycles_v2(call.now)
    return Reply(body, lead=(-1, "start"), required=(-1, "end"))


def expected_consumption_v2(
    org_ids: Sequence[str],
    start: datetime | None,
    end: datetime | None,
    *,
    now: datetime,
    user_id: str | None = None,
    enterprise_org_ids: Sequence[str] = ENTERPRISE_ORG_IDS,
) -> dict[str, JSONValue]:
    """The body of GET /v2/enterprise/consumption/daily (`user_id` None) or .../daily/{user_id}.

    Bounds as in `expected_usage`: none means the current billing cycle so far. Without
    `org_ids` the enterprise total is every listed org's Devin ACUs plus the Cascade, Terminal
    and review ACUs no org owns; with `org_ids` only those orgs' Devin ACUs count, as the docs
    say. A user gets a stable share of each org's Devin ACUs. `consumption_by_date` is keyed by
    the billing day (08:00 UTC to 08:00 UTC, named by the UTC date it starts on) and holds the
    part of each day inside the window; days sum to `total_acus`, and so do the orgs of
    `consumption_by_org_id` when there is no unowned part. `consumption_by_user` (the enterprise
    route only) lists ENTERPRISE_USER_IDS, each what its own route would return.
    """
    start, end = window(start, end, now)
    orgs = scope(org_ids, enterprise_org_ids)
    spent = consumption(orgs, start, end, user_id=user_id, unowned=not org_ids and user_id is None)
    body: dict[str, JSONValue] = {
        "total_acus": acus(spent.total),
        "consumption_by_date": {day.strftime("%Y-%m-%d"): acus(sum(products)) for day, products in spent.days},
        "consumption_by_org_id": {org: acus(part) for org, part in spent.by_org},
    }
    if user_id is None:
        body["consumption_by_user"] = {
            user: acus(consumption(orgs, start, end, user_id=user).total) for user in ENTERPRISE_USER_IDS
        }
    return body


def _daily(call: Call) -> Reply:
    start, end = _read_window(QueryReader(call.query))
    body = expected_consumption_v2(
        call.query.get("org_ids", ()),
        start,
        end,
        now=call.now,
        user_id=call.params.get("user_id"),
        enterprise_org_ids=call.enterprise_org_ids,
    )
    return Reply(body, lead=("total_acus",), required=("total_acus",))


ROUTES: Final = (
    Route(USAGE_PATH, _usage),
    Route(ORGANIZATIONS_PATH, _organizations),
    Route(CYCLES_PATH, _cycles),
    Route(DAILY_PATH, _daily),
    Route(USER_DAILY_PATH, _daily),
)
