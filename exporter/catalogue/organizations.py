"""The organizations collector: names, ACU limits and the billing cycle (SPEC §10); discovery reads it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Final

from exporter.catalogue import replies
from exporter.catalogue.declare import Collector, Derived, Endpoint, Family, Point, Query
from exporter.config import OrgSet

INFO: Final = "devin_organization_info"
CYCLE_LIMIT: Final = "devin_organization_acu_cycle_limit"
SESSION_LIMIT: Final = "devin_organization_session_acu_limit"
CYCLE_START: Final = "devin_billing_cycle_start_timestamp_seconds"
CYCLE_END: Final = "devin_billing_cycle_end_timestamp_seconds"

FAMILIES: Final = (
    Family(INFO, "Organizations of the enterprise, with their names; constant 1", ("org_id", "org_name")),
    Family(CYCLE_LIMIT, "ACU limit per billing cycle of the organization (absent while it has none)",
           ("org_id",)),
    Family(SESSION_LIMIT, "ACU limit per session of the organization (absent while it has none)", ("org_id",)),
    Family(CYCLE_START, "Unix time the current billing cycle started"),
    Family(CYCLE_END, "Unix time the current billing cycle ends"),
)


def _org_points(items: Sequence[Mapping[str, object]], name_field: str) -> Iterable[Point]:
    for item in sorted(items, key=lambda i: str(i["org_id"])):
        org_id, name = str(item["org_id"]), str(item[name_field])
        yield Point(INFO, 1.0, (("org_id", org_id), ("org_name", name)))
        for field_name, family in (("max_cycle_acu_limit", CYCLE_LIMIT), ("max_session_acu_limit", SESSION_LIMIT)):
            limit = item.get(field_name)
            if isinstance(limit, int):
                yield Point(family, limit, (("org_id", org_id),))


_LIMITS: Final = {"max_cycle_acu_limit": replies.optional(replies.count),
                  "max_session_acu_limit": replies.optional(replies.count)}


def _read_v3_org(item: object) -> dict[str, object]:
    return replies.fields(item, {"org_id": replies.text, "name": replies.text, **_LIMITS}, what="organization")


def _read_v2_org(item: object) -> dict[str, object]:
    # The limits are `integer | null` and may be left out; the name is required.
    return replies.fields(item, {"org_id": replies.text, "org_name": replies.text, **_LIMITS},
                          optional_fields=_LIMITS, what="organization")


V3_ORGANIZATIONS: Final = Endpoint(
    "/v3/enterprise/organizations", "v3", _read_v3_org, lambda items, q: _org_points(items, "name"),
    (INFO, CYCLE_LIMIT, SESSION_LIMIT), paging="cursor")
V2_ORGANIZATIONS: Final = Endpoint(
    "/v2/enterprise/organizations", "v2", _read_v2_org, lambda items, q: _org_points(items, "org_name"),
    (INFO, CYCLE_LIMIT, SESSION_LIMIT), paging="skip_limit")


def current_cycle(cycles: Iterable[tuple[float, float]], now: float) -> tuple[float, float] | None:
    """The cycle that holds `now`, else the latest one to have started; None for no cycle."""
    started = [c for c in cycles if c[0] <= now]
    holding = [c for c in started if now < c[1]]
    return max(holding or started, default=None)


def _cycle_points(cycles: Iterable[tuple[float, float]], query: Query) -> Iterable[Point]:
    now = (query.end or datetime.now(UTC)).timestamp()
    cycle = current_cycle(cycles, now)
    if cycle is not None:
        yield Point(CYCLE_START, cycle[0])
        yield Point(CYCLE_END, cycle[1])


def _read_v3_cycle(item: object) -> tuple[float, float]:
    checked = replies.fields(item, {"after": replies.unix_time, "before": replies.unix_time}, what="cycle")
    return float(checked["after"]), float(checked["before"])  # type: ignore[arg-type]


def _read_v2_cycles(document: object) -> list[tuple[float, float]]:
    cycles = []
    for item in replies.array(document):
        checked = replies.fields(item, {"start": replies.rfc3339, "end": replies.rfc3339}, what="cycle")
        cycles.append((float(checked["start"]), float(checked["end"])))  # type: ignore[arg-type]
    return cycles


V3_CYCLES: Final = Endpoint(
    "/v3/enterprise/consumption/cycles", "v3", _read_v3_cycle, _cycle_points, (CYCLE_START, CYCLE_END),
    paging="cursor")
V2_CYCLES: Final = Endpoint(
    "/v2/enterprise/consumption/cycles", "v2", _read_v2_cycles,
    lambda replies_, q: _cycle_points((c for reply in replies_ for c in reply), q), (CYCLE_START, CYCLE_END))


def _set_cycle_limit(points: Sequence[Point]) -> Callable[[OrgSet], float | None]:
    """The sum of a set's organizations' cycle limits, when every one of them has a limit."""
    limits = {dict(p.labels)["org_id"]: p.value for p in points if p.family == CYCLE_LIMIT}

    def of(org_set: OrgSet) -> float | None:
        if not org_set.org_ids:
            return None  # the whole enterprise: its limit is not an organization's
        ids = set(org_set.org_ids)
        if not ids <= limits.keys():
            return None
        return sum(limits[i] for i in ids)

    return of


ORGANIZATIONS: Final = Collector(
    "organizations", "enterprise", FAMILIES,
    {"v3": ((V3_ORGANIZATIONS,), (V3_CYCLES,)), "v2": ((V2_ORGANIZATIONS,), (V2_CYCLES,))},
    permission="ManageOrganizations (and ViewAccountConsumption or ManageBilling for the cycles)",
    windowed=False,
    derived=(Derived(Family("devin_acu_cycle_limit",
                            "ACU limit per billing cycle of the org set: the sum of its organizations' limits, "
                            "when every one has a limit"), _set_cycle_limit),))


def organizations(points: Iterable[Point]) -> list[tuple[str, str]]:
    """(org_id, name) of every organization the latest organizations poll listed."""
    return [(labels["org_id"], labels["org_name"]) for labels in
            (dict(p.labels) for p in points if p.family == INFO)]
