"""API v3 routes (`cog_` service-user tokens): parameters as FastAPI reads them, replies per the v3 docs."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Final

from exporter.simulator.model import Organization, created_at, queue_size, updated_at
from exporter.simulator.query import QueryReader, validation_error
from exporter.simulator.route import Call, JSONPath, JSONValue, Reply, Route

__all__ = [
    "ORGANIZATIONS_PATH",
    "QUEUE_PATH",
    "ROUTES",
    "expected_organizations_v3",
    "expected_queue",
    "permission",
    "unix",
]

QUEUE_PATH: Final = "/v3/enterprise/queue"
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


def _queue_status(size: int) -> str:
    """The docs' thresholds: normal up to 10 queued sessions, elevated up to 50, high beyond."""
    return "normal" if size <= 10 else "elevated" if size <= 50 else "high"


def expected_queue(now: datetime) -> dict[str, JSONValue]:
    """The body of GET /v3/enterprise/queue at `now`: {queue_size, status}."""
    size = queue_size(now)
    return {"queue_size": size, "status": _queue_status(size)}


def _queue(call: Call) -> Reply:
    return Reply(expected_queue(call.now), lead=("queue_size",), required=("status",))


def unix(t: datetime) -> int:
    """An instant as v3 writes it: whole Unix seconds."""
    return int(t.timestamp())


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
    page = list(items[offset : offset + min(first, call.page_size)])
    has_next = offset + len(page) < len(items)
    body: dict[str, JSONValue] = {
        "items": page,
        "has_next_page": has_next,
        "end_cursor": _cursor(offset + len(page)) if has_next else None,
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


ROUTES: Final = (Route(QUEUE_PATH, _queue), Route(ORGANIZATIONS_PATH, _organizations))
