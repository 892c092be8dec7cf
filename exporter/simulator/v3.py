"""API v3 routes (`cog_` service-user tokens): parameters as FastAPI reads them, replies per the v3 docs."""

from __future__ import annotations

from datetime import datetime
from typing import Final

from exporter.simulator.model import queue_size
from exporter.simulator.route import Call, JSONValue, Reply, Route

__all__ = ["QUEUE_PATH", "ROUTES", "expected_queue", "permission"]

QUEUE_PATH: Final = "/v3/enterprise/queue"

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


ROUTES: Final = (Route(QUEUE_PATH, _queue),)
