"""The usage collector: sessions, searches and pull requests per org set and window (SPEC §4, §10)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

from exporter.catalogue import replies
from exporter.catalogue.declare import Collector, Endpoint, Family, Point, Query, one_label

_TAIL: Final = "in the trailing window, as returned by the Devin API"

FAMILIES: Final = (
    Family("devin_usage_sessions", f"Count of Devin sessions created {_TAIL}"),
    Family("devin_usage_searches", f"Count of Devin searches {_TAIL}"),
    Family("devin_usage_prs_opened", f"Count of pull requests opened by Devin {_TAIL}"),
    Family("devin_usage_prs_closed", f"Count of pull requests opened by Devin that were closed {_TAIL}"),
    Family("devin_usage_prs_merged", f"Count of pull requests opened by Devin that were merged {_TAIL}"),
    Family("devin_usage_prs_created", f"Count of pull requests created by Devin {_TAIL} (v3 only)"),
    Family("devin_usage_sessions_with_playbook", f"Count of sessions created with a playbook {_TAIL} (v3 only)"),
    Family("devin_usage_sessions_with_search", f"Count of sessions created with a search {_TAIL} (v3 only)"),
    Family("devin_usage_sessions_with_merged_prs", f"Count of sessions with merged pull requests {_TAIL} (v3 only)"),
    Family("devin_usage_acus_per_session", f"Average ACUs per session {_TAIL} (v3 only)"),
    Family("devin_usage_sessions_by_origin", f"Count of sessions created, by origin, {_TAIL} (v3 only)",
           ("origin",)),
    Family("devin_usage_sessions_by_size", f"Count of sessions created, by size class, {_TAIL} (v3 only)",
           ("size",)),
)


def _counts(schema: Mapping[str, str]) -> dict[str, replies.Kind]:
    return dict.fromkeys(schema, replies.count)


def _as_points(reply: Mapping[str, object], names: Mapping[str, str]) -> Iterable[Point]:
    for field_name, family in names.items():
        value = reply[field_name]
        assert isinstance(value, (int, float))
        yield Point(family, value)


# --- v2: one call answers everything --------------------------------------------------------

V2_FIELDS: Final = {
    "sessions_count": "devin_usage_sessions",
    "searches_count": "devin_usage_searches",
    "prs_opened": "devin_usage_prs_opened",
    "prs_closed": "devin_usage_prs_closed",
    "prs_merged": "devin_usage_prs_merged",
}
EXTRA_PREFIX: Final = "devin_usage_"


def _read_v2(document: object) -> dict[str, float]:
    reply = replies.obj(document)
    checked = replies.fields(reply, _counts(V2_FIELDS))
    values = {name: float(value) if isinstance(value, float) else value for name, value in checked.items()
              if isinstance(value, (int, float))}
    return {**values, **replies.numeric_extras(reply, V2_FIELDS)}


def _v2_points(replies_: Sequence[dict[str, float]], query: Query) -> Iterable[Point]:
    for reply in replies_:
        for field_name, value in reply.items():
            # Extra numeric fields the API may add become devin_usage_<field> (SPEC §4).
            yield Point(V2_FIELDS.get(field_name, EXTRA_PREFIX + field_name), value)


V2_USAGE: Final = Endpoint(
    "/v2/enterprise/metrics/usage", "v2", _read_v2, _v2_points, tuple(V2_FIELDS.values()),
    bounds="rfc3339", filters=frozenset({"org_ids", "user_ids"}))


# --- v3: sessions, pull requests and searches are three calls ----------------------------------

SESSIONS_FIELDS: Final = {
    "sessions_created_count": "devin_usage_sessions",
    "sessions_created_with_playbook_count": "devin_usage_sessions_with_playbook",
    "sessions_created_with_search_count": "devin_usage_sessions_with_search",
    "sessions_with_merged_prs_count": "devin_usage_sessions_with_merged_prs",
}
_BY_LABEL: Final = {"sessions_created_by_origin": ("devin_usage_sessions_by_origin", "origin"),
                    "sessions_created_by_size": ("devin_usage_sessions_by_size", "size")}


def _read_sessions(document: object) -> dict[str, object]:
    schema: dict[str, replies.Kind] = {**_counts(SESSIONS_FIELDS), "avg_acus_per_session": replies.amount,
                                       **dict.fromkeys(_BY_LABEL, replies.count_map)}
    return replies.fields(document, schema)


def _sessions_points(replies_: Sequence[dict[str, object]], query: Query) -> Iterable[Point]:
    for reply in replies_:
        yield from _as_points(reply, SESSIONS_FIELDS)
        average = reply["avg_acus_per_session"]
        assert isinstance(average, float)
        yield Point("devin_usage_acus_per_session", average)
        for field_name, (family, label) in _BY_LABEL.items():
            counts = reply[field_name]
            assert isinstance(counts, dict)
            for key, value in sorted(counts.items()):  # one series per key the API returned
                yield Point(family, value, one_label(label, key))


PRS_FIELDS: Final = {
    "prs_opened_count": "devin_usage_prs_opened",
    "prs_closed_count": "devin_usage_prs_closed",
    "prs_merged_count": "devin_usage_prs_merged",
    "prs_created_count": "devin_usage_prs_created",
}
SEARCHES_FIELDS: Final = {"searches_created_count": "devin_usage_searches"}


def _reader(names: Mapping[str, str]) -> Callable[[object], dict[str, object]]:
    """A reply of only counts, exactly these fields."""
    return lambda document: replies.fields(document, _counts(names))


def _pointer(names: Mapping[str, str]) -> Callable[[Sequence[dict[str, object]], Query], Iterable[Point]]:
    def points(replies_: Sequence[dict[str, object]], query: Query) -> Iterable[Point]:
        for reply in replies_:
            yield from _as_points(reply, names)
    return points


V3_SESSIONS: Final = Endpoint(
    "/v3/enterprise/metrics/sessions", "v3", _read_sessions, _sessions_points,
    (*SESSIONS_FIELDS.values(), "devin_usage_acus_per_session", *(f for f, _ in _BY_LABEL.values())),
    bounds="unix", filters=frozenset({"org_ids", "user_ids"}))
V3_PRS: Final = Endpoint(
    "/v3/enterprise/metrics/prs", "v3", _reader(PRS_FIELDS), _pointer(PRS_FIELDS), tuple(PRS_FIELDS.values()),
    bounds="unix", filters=frozenset({"org_ids", "user_ids"}))
# Takes no user_ids: a set with user_ids gets no searches rather than the whole org's (SPEC §10).
V3_SEARCHES: Final = Endpoint(
    "/v3/enterprise/metrics/searches", "v3", _reader(SEARCHES_FIELDS), _pointer(SEARCHES_FIELDS),
    tuple(SEARCHES_FIELDS.values()), bounds="unix", filters=frozenset({"org_ids"}))

USAGE: Final = Collector(
    "usage", "org_set", FAMILIES,
    {"v3": ((V3_SESSIONS,), (V3_PRS,), (V3_SEARCHES,)), "v2": ((V2_USAGE,),)},
    permission="ViewAccountMetrics", cycle_bounds=frozenset({"v3"}), extra_prefix=EXTRA_PREFIX)
