"""The active_users collector (v3 only): distinct users active in each window (SPEC §10)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from exporter.catalogue import replies
from exporter.catalogue.declare import Collector, Endpoint, Family, Point, Query

ACTIVE_USERS: Final = "devin_usage_active_users"


def _read(document: object) -> dict[str, object]:
    return replies.fields(document, {"active_users": replies.count})


def _points(replies_: Sequence[dict[str, object]], query: Query) -> Iterable[Point]:
    for reply in replies_:
        value = reply["active_users"]
        assert isinstance(value, int)
        yield Point(ACTIVE_USERS, value)


# Takes org_ids but no user_ids: a set with user_ids gets nothing rather than its orgs' count.
V3_ACTIVE_USERS: Final = Endpoint("/v3/enterprise/metrics/active-users", "v3", _read, _points, (ACTIVE_USERS,),
                                  bounds="unix", filters=frozenset({"org_ids"}), options=True)

ACTIVE_USERS_COLLECTOR: Final = Collector(
    "active_users", "org_set",
    (Family(ACTIVE_USERS, "Distinct users with at least min_sessions sessions or min_searches searches in the "
            "trailing window (v3 only)"),),
    {"v3": ((V3_ACTIVE_USERS,),)}, permission="ViewAccountMetrics",
    options=("min_sessions", "min_searches"))
