"""API v3 and v2 end to end (SPEC §9, §10): the exporter against the simulator at a fixed clock.

Every published value is checked against what the simulator served for the parameters the
exporter really sent: each request's bounds and filters are read back from the simulator's request
log and fed to the simulator's `expected_*` helpers. The windows those bounds mean are worked out
here from first principles (the window's length, local midnight, the current billing cycle), not
with the exporter's code.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Final
from zoneinfo import ZoneInfo

import pytest
from helpers import T0, Labels, WallClock, labels
from v3_support import V3_TOKEN, Rig, Rigs, Samples, series, unix

from exporter import __version__
from exporter.config import OrgSet
from exporter.simulator import (
    RecordedRequest,
    expected_cycles_v2,
    expected_cycles_v3,
    expected_organizations_v2,
    expected_organizations_v3,
    expected_prs,
    expected_searches,
    expected_sessions,
    expected_usage,
    parse_datetime,
)

# The SPEC §10 table, written out here (not imported from the catalogue) so a typo in a
# declaration fails this test instead of being mirrored by it.
SESSIONS: Final = "/v3/enterprise/metrics/sessions"
PRS: Final = "/v3/enterprise/metrics/prs"
SEARCHES: Final = "/v3/enterprise/metrics/searches"
V3_CYCLES: Final = "/v3/enterprise/consumption/cycles"
V2_USAGE: Final = "/v2/enterprise/metrics/usage"
SESSIONS_FIELDS: Final = {
    "sessions_created_count": "devin_usage_sessions",
    "sessions_created_with_playbook_count": "devin_usage_sessions_with_playbook",
    "sessions_created_with_search_count": "devin_usage_sessions_with_search",
    "sessions_with_merged_prs_count": "devin_usage_sessions_with_merged_prs",
    "avg_acus_per_session": "devin_usage_acus_per_session",
}
BY_LABEL: Final = {"sessions_created_by_origin": ("devin_usage_sessions_by_origin", "origin"),
                   "sessions_created_by_size": ("devin_usage_sessions_by_size", "size")}
PRS_FIELDS: Final = {
    "prs_opened_count": "devin_usage_prs_opened",
    "prs_closed_count": "devin_usage_prs_closed",
    "prs_merged_count": "devin_usage_prs_merged",
    "prs_created_count": "devin_usage_prs_created",
}
V2_FIELDS: Final = {
    "sessions_count": "devin_usage_sessions",
    "searches_count": "devin_usage_searches",
    "prs_opened": "devin_usage_prs_opened",
    "prs_closed": "devin_usage_prs_closed",
    "prs_merged": "devin_usage_prs_merged",
}

# Four shapes: the whole enterprise; two orgs that both have a cycle limit (with a static label);
# two orgs of which one has none; one org with users and the calendar windows.
SETS: Final = """
- name: enterprise
- name: platform
  org_ids: [org-platform-1, org-mobile]
  labels: {team: platform}
- name: payments
  org_ids: [org-123, org-456]
- name: oncall
  org_ids: [org-789]
  user_ids: [user-1, user-2]
  windows: [24h, today, month_to_date, billing_cycle]
"""
WINDOWS: Final = "[1h, 7d, {range: 30d, interval: 30m}]"
ZONE: Final = "America/Los_Angeles"
DELAY: Final = timedelta(minutes=5)
END: Final = T0 - DELAY  # 2026-11-24T17:55Z, 09:55 in Los Angeles (PST, UTC-8)
LENGTHS: Final = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
# Local midnight in Los Angeles: today is PST (UTC-8); 1 November was still PDT (UTC-7) at
# midnight, as DST ended at 02:00 that day, so the month began at 07:00Z, not 08:00Z.
CALENDAR_STARTS: Final = {"today": datetime(2026, 11, 24, 8, tzinfo=UTC),
                          "month_to_date": datetime(2026, 11, 1, 7, tzinfo=UTC)}
# The simulator's billing cycles begin on the 5th at 08:00 UTC.
CYCLE: Final = (datetime(2026, 11, 5, 8, tzinfo=UTC), datetime(2026, 12, 5, 8, tzinfo=UTC))

Key = tuple[str, Labels]


def current_cycle_v3(now: datetime) -> tuple[int, int]:
    """The cycle of the simulator's cycles list that holds `now`."""
    cycles = [(int(str(c["after"])), int(str(c["before"])))  # type: ignore[index, call-overload]
              for c in expected_cycles_v3(now)]
    (current,) = [c for c in cycles if c[0] <= now.timestamp() < c[1]]
    return current


def set_of(config_sets: tuple[OrgSet, ...], request: RecordedRequest) -> OrgSet:
    """The org set whose filters the request carried (each set's filters are distinct here)."""
    org_ids = tuple(request.query.get("org_ids", ()))
    user_ids = tuple(request.query.get("user_ids", ()))
    (org_set,) = [s for s in config_sets if (s.org_ids, s.user_ids) == (org_ids, user_ids)]
    return org_set


def window_of(org_set: OrgSet, start: int | None, end: int | None, cycle_start: int | None) -> str:
    """The one window of the set whose bounds these are, by what the window means."""
    def means(name: str) -> int | None:
        if name in LENGTHS:
            return unix(END) - LENGTHS[name]
        if name in CALENDAR_STARTS:
            return unix(CALENDAR_STARTS[name])
        assert name == "billing_cycle"
        return cycle_start

    if start is not None:
        assert end == unix(END), "every window ends at now - delay"
    matching = [w.name for w in org_set.windows if means(w.name) == start]
    assert len(matching) == 1, f"{org_set.name}: bounds {start}..{end} mean {matching}"
    return matching[0]


def scope(org_set: OrgSet, window: str | None = None, **own: str) -> Labels:
    where = {"org": org_set.name, **({"window": window} if window else {})}
    return labels(**where, **own, **dict(org_set.labels))


def usage_of(samples: Samples) -> dict[Key, float]:
    return series(samples, "devin_usage_", exclude=["devin_usage_last_success_timestamp_seconds"])


def expected_v3_usage(rig: Rig) -> tuple[dict[Key, float], Counter[tuple[str, str, str]]]:
    """What every v3 metrics request the simulator received should publish, and which
    (org set, window, path) each request was."""
    enterprise = [o.org_id for o in rig.organizations()]
    cycle_start = current_cycle_v3(T0)[0]
    expected: dict[Key, float] = {}
    asked: Counter[tuple[str, str, str]] = Counter()
    for request in rig.requests("/v3/enterprise/metrics/"):
        org_set = set_of(rig.config.org_sets, request)
        (after,), (before,) = request.query["time_after"], request.query["time_before"]
        window = window_of(org_set, int(after), int(before), cycle_start)
        asked[org_set.name, window, request.path] += 1
        org_ids, user_ids = request.query.get("org_ids", []), request.query.get("user_ids", [])
        bounds = (int(after), int(before))
        if request.path == SESSIONS:
            body: Mapping[str, object] = expected_sessions(org_ids, user_ids, *bounds, now=T0,
                                                           enterprise_org_ids=enterprise)
            for api_field, metric in SESSIONS_FIELDS.items():
                expected[metric, scope(org_set, window)] = float(body[api_field])  # type: ignore[arg-type]
            for api_field, (metric, label) in BY_LABEL.items():
                by_key = body[api_field]
                assert isinstance(by_key, dict)
                for key, value in by_key.items():
                    expected[metric, scope(org_set, window, **{label: key})] = float(value)
        elif request.path == PRS:
            body = expected_prs(org_ids, user_ids, *bounds, now=T0, enterprise_org_ids=enterprise)
            for api_field, metric in PRS_FIELDS.items():
                expected[metric, scope(org_set, window)] = float(body[api_field])  # type: ignore[arg-type]
        else:
            assert request.path == SEARCHES, request.path
            assert "user_ids" not in request.query
            body = expected_searches(org_ids, *bounds, now=T0, enterprise_org_ids=enterprise)
            expected["devin_usage_searches", scope(org_set, window)] = float(body["searches_created_count"])  # type: ignore[arg-type]
    return expected, asked


def expected_organizations(rig: Rig, items: list[Mapping[str, object]], name_field: str) -> dict[Key, float]:
    """The organizations families for these listed items and the rig's org sets."""
    out: dict[Key, float] = {}
    limits: dict[str, object] = {}
    for item in items:
        org_id = str(item["org_id"])
        out["devin_organization_info", labels(org_id=org_id, org_name=str(item[name_field]))] = 1.0
        limits[org_id] = item["max_cycle_acu_limit"]
        for api_field, metric in (("max_cycle_acu_limit", "devin_organization_acu_cycle_limit"),
                                  ("max_session_acu_limit", "devin_organization_session_acu_limit")):
            if item[api_field] is not None:
                out[metric, labels(org_id=org_id)] = float(item[api_field])  # type: ignore[arg-type]
    for org_set in rig.config.org_sets:
        set_limits = [limits.get(org_id) for org_id in org_set.org_ids]
        if set_limits and all(isinstance(limit, int) for limit in set_limits):
            out["devin_acu_cycle_limit", scope(org_set)] = float(sum(set_limits))  # type: ignore[arg-type]
    return out


ORGANIZATION_FAMILIES: Final = ("devin_organization_", "devin_acu_cycle_limit", "devin_billing_cycle_")


# --------------------------------------------------------------------------------------------
# v3


async def test_v3_publishes_exactly_what_the_simulator_served_for_the_bounds_the_exporter_sent(rigs: Rigs) -> None:
    rig = await rigs.start(SETS, windows=WINDOWS, delay="5m", zone=ZONE)
    samples = await rig.samples()

    # v3 paths only, with the service user's token; nothing on the legacy API.
    assert rig.requests("/v2/") == []
    assert {r.path for r in rig.requests()} == {
        SESSIONS, PRS, SEARCHES, "/v3/enterprise/organizations", V3_CYCLES}
    assert {r.status for r in rig.requests()} == {200}
    assert sum(samples["devin_exporter_api_requests_total"].values()) == len(rig.requests())

    expected, asked = expected_v3_usage(rig)
    # Each (set, window) asked sessions and PRs once, and searches unless the set has user_ids.
    want: Counter[tuple[str, str, str]] = Counter()
    for org_set in rig.config.org_sets:
        for window in org_set.windows:
            for path in (SESSIONS, PRS, *(() if org_set.user_ids else (SEARCHES,))):
                want[org_set.name, window.name, path] += 1
    assert asked == want
    assert usage_of(samples) == expected
    # The comparison is not degenerate: 3 sets x 3 windows + 4 windows, counts that differ.
    assert len({v for (name, _), v in expected.items() if name == "devin_usage_sessions"}) == 13
    assert all(v > 0 for (name, _), v in expected.items() if name == "devin_usage_sessions")
    assert {dict(lbls)["origin"] for name, lbls in expected if name == "devin_usage_sessions_by_origin"} >= {
        "webapp", "slack"}

    # A set with user_ids gets no searches: the endpoint cannot filter by user.
    assert {dict(lbls)["org"] for lbls in samples["devin_usage_searches"]} == {"enterprise", "platform", "payments"}
    assert {dict(lbls)["org"] for lbls in samples["devin_usage_sessions"]} == set(rig.set_names())

    # The billing_cycle window sends the current cycle's start, as the cycles endpoint lists it.
    assert current_cycle_v3(T0) == (unix(CYCLE[0]), unix(CYCLE[1]))
    billing = [r.query for r in rig.requests(SESSIONS) if r.query["time_after"] == [str(unix(CYCLE[0]))]]
    assert billing == [{"time_after": [str(unix(CYCLE[0]))], "time_before": [str(unix(END))],
                        "org_ids": ["org-789"], "user_ids": ["user-1", "user-2"]}]
    assert rig.requests(V3_CYCLES), "the cycle came from the cycles endpoint"

    # Organizations: every org of every page, both limits where set, each set's summed limit.
    organizations = expected_organizations(rig, expected_organizations_v3(rig.organizations()), "name")  # type: ignore[arg-type]
    organizations["devin_billing_cycle_start_timestamp_seconds", labels()] = CYCLE[0].timestamp()
    organizations["devin_billing_cycle_end_timestamp_seconds", labels()] = CYCLE[1].timestamp()
    assert series(samples, ORGANIZATION_FAMILIES[0]) | series(samples, ORGANIZATION_FAMILIES[1]) | series(
        samples, ORGANIZATION_FAMILIES[2]) == organizations
    # platform's two orgs both have a cycle limit; payments' org-123 has none, so no sum is published.
    assert samples["devin_acu_cycle_limit"] == {labels(org="platform", team="platform"): 40_000.0 + 120_000.0}
    assert len(samples["devin_organization_info"]) == 6

    assert samples["devin_exporter_api_info"] == {labels(version="v3"): 1.0}
    assert {dict(lbls)["version"] for lbls in samples["devin_exporter_build_info"]} == {__version__}
    assert V3_TOKEN not in await rig.scrape()


async def test_v3_duration_windows_span_exactly_their_length_and_calendar_windows_start_at_local_midnight(
    rigs: Rigs,
) -> None:
    rig = await rigs.start(SETS, windows=WINDOWS, delay="5m", zone=ZONE)
    bounds = {(set_of(rig.config.org_sets, r).name, int(r.query["time_after"][0]), int(r.query["time_before"][0]))
              for r in rig.requests(SESSIONS)}
    spans = Counter(before - after for _, after, before in bounds)
    # 1h, 7d, 30d for three sets; 24h for oncall; all whole seconds and all ending at now - delay.
    assert {s: spans[s] for s in (3600, 7 * 86400, 30 * 86400, 86400)} == {
        3600: 3, 7 * 86400: 3, 30 * 86400: 3, 86400: 1}
    assert {before for _, _, before in bounds} == {unix(END)}
    oncall_starts = {datetime.fromtimestamp(after, UTC) for name, after, _ in bounds if name == "oncall"}
    assert oncall_starts == {END - timedelta(hours=24), *CALENDAR_STARTS.values(), CYCLE[0]}
    # Independently of the constants above: those starts are midnights on the Los Angeles clock.
    zone = ZoneInfo(ZONE)
    for start in CALENDAR_STARTS.values():
        local = start.astimezone(zone)
        assert (local.hour, local.minute, local.second) == (0, 0, 0)
    assert CALENDAR_STARTS["month_to_date"].astimezone(zone).day == 1


async def test_billing_cycle_window_asks_the_cycles_endpoint_and_moves_on_when_a_new_cycle_begins(
    rigs: Rigs,
) -> None:
    clock = WallClock()
    # Without the organizations collector, the cycle comes from the cycles endpoint alone.
    rig = await rigs.start("- name: oncall\n  org_ids: [org-789]\n  windows: [billing_cycle]\n",
                           clock=clock, collectors="{organizations: {enabled: false}, consumption: {enabled: false}, "
                                                            "active_users: {enabled: false}, queue: {enabled: false}}")
    (first,) = rig.requests(SESSIONS)
    assert first.query["time_after"] == [str(unix(CYCLE[0]))] and first.query["time_before"] == [str(unix(T0))]
    cycle_requests = len(rig.requests(V3_CYCLES))
    assert cycle_requests > 0
    # Every response is counted, the cycles endpoint's too, under the collector whose endpoint it is.
    counted = (await rig.samples())["devin_exporter_api_requests_total"]
    assert counted == {labels(collector="usage", org="oncall", code="200"): 3.0,
                       labels(collector="organizations", code="200"): float(cycle_requests)}

    # A later poll in the same cycle reuses the cycle it knows.
    clock.advance(3600)
    assert await rig.poll("usage", "oncall") == [True]
    assert len(rig.requests(V3_CYCLES)) == cycle_requests

    # Past the cycle's end, it asks again and sends the new cycle's start.
    clock.now = datetime(2026, 12, 6, 12, tzinfo=UTC)
    assert await rig.poll("usage", "oncall") == [True]
    assert len(rig.requests(V3_CYCLES)) > cycle_requests
    latest = rig.requests(SESSIONS)[-1]
    new_start = unix(datetime(2026, 12, 5, 8, tzinfo=UTC))
    assert current_cycle_v3(clock.now)[0] == new_start
    assert latest.query["time_after"] == [str(new_start)]
    assert latest.query["time_before"] == [str(unix(clock.now))]
    sessions = expected_sessions(["org-789"], [], new_start, unix(clock.now), now=clock.now)
    assert (await rig.samples())["devin_usage_sessions"] == {
        labels(org="oncall", window="billing_cycle"): float(sessions["sessions_created_count"])}  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# v2


async def test_v2_key_polls_only_v2_paths_and_publishes_release_0_1_families_and_organizations(rigs: Rigs) -> None:
    rig = await rigs.start(SETS, version="v2", windows=WINDOWS, delay="5m", zone=ZONE)
    samples = await rig.samples()
    assert rig.requests("/v3/") == []
    assert {r.path for r in rig.requests()} == {
        V2_USAGE, "/v2/enterprise/organizations", "/v2/enterprise/consumption/cycles"}

    enterprise = [o.org_id for o in rig.organizations()]
    expected: dict[Key, float] = {}
    asked: Counter[tuple[str, str]] = Counter()
    for request in rig.requests(V2_USAGE):
        org_set = set_of(rig.config.org_sets, request)
        start = parse_datetime(request.query["start_date"][0]) if "start_date" in request.query else None
        end = parse_datetime(request.query["end_date"][0]) if "end_date" in request.query else None
        # v2 usage keeps sending no dates for billing_cycle: the API defaults to the current cycle.
        window = window_of(org_set, unix(start) if start else None, unix(end) if end else None, None)
        asked[org_set.name, window] += 1
        body = expected_usage(request.query.get("org_ids", []), request.query.get("user_ids", []), start, end,
                              now=T0, enterprise_org_ids=enterprise)
        for api_field, metric in V2_FIELDS.items():
            expected[metric, scope(org_set, window)] = float(body[api_field])
    assert asked == Counter({(s.name, w.name): 1 for s in rig.config.org_sets for w in s.windows})
    assert usage_of(samples) == expected
    assert len(expected) == 5 * 13
    # On v2 a set with user_ids does get searches: that endpoint filters them by user.
    assert labels(org="oncall", window="24h") in samples["devin_usage_searches"]
    billing = [r.query for r in rig.requests(V2_USAGE) if "start_date" not in r.query]
    assert billing == [{"org_ids": ["org-789"], "user_ids": ["user-1", "user-2"]}]

    organizations = expected_organizations(rig, expected_organizations_v2(rig.organizations()), "org_name")  # type: ignore[arg-type]
    cycles = [(parse_datetime(str(c["start"])), parse_datetime(str(c["end"])))  # type: ignore[index, call-overload]
              for c in expected_cycles_v2(T0)]
    assert [c for c in cycles if c[0] <= T0 < c[1]] == [CYCLE]
    organizations["devin_billing_cycle_start_timestamp_seconds", labels()] = CYCLE[0].timestamp()
    organizations["devin_billing_cycle_end_timestamp_seconds", labels()] = CYCLE[1].timestamp()
    assert series(samples, ORGANIZATION_FAMILIES[0]) | series(samples, ORGANIZATION_FAMILIES[1]) | series(
        samples, ORGANIZATION_FAMILIES[2]) == organizations
    assert samples["devin_acu_cycle_limit"] == {labels(org="platform", team="platform"): 160_000.0}
    assert samples["devin_exporter_api_info"] == {labels(version="v2"): 1.0}


# --------------------------------------------------------------------------------------------
# Health per collector


THREE_SETS: Final = """
- name: enterprise
- name: platform
  org_ids: [org-platform-1, org-mobile]
- name: oncall
  org_ids: [org-789]
  user_ids: [user-1]
"""


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_403_on_one_path_downs_only_its_collector_with_one_log_line_naming_the_permission(
    rigs: Rigs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rig = await rigs.start(THREE_SETS, windows="[1h, 24h]")
    names = rig.set_names()
    before = await rig.samples()
    assert before["devin_up"] == {labels(org=n): 1.0 for n in names}
    assert before["devin_collector_up"] == {
        **{labels(collector="usage", org=n): 1.0 for n in names}, labels(collector="organizations"): 1.0}

    # The service user loses ManageOrganizations: the organizations collector goes down, only it.
    caplog.clear()
    rig.faults.update({"status": 403, "paths": ["/v3/enterprise/organizations"]})
    assert await rig.poll_organizations() is False
    assert await rig.poll_organizations() is False  # failing again says nothing new
    assert [await rig.poll("usage", n) for n in names] == [[True, True]] * 3
    samples = await rig.samples()
    assert samples["devin_collector_up"] == {
        **{labels(collector="usage", org=n): 1.0 for n in names}, labels(collector="organizations"): 0.0}
    assert samples["devin_up"] == {labels(org=n): 1.0 for n in names}
    # Its last good values stay published until they are stale.
    assert series(samples, "devin_organization_") == series(before, "devin_organization_")
    assert samples["devin_exporter_api_errors_total"][labels(collector="organizations", reason="auth")] == 2.0
    (line,) = warnings_of(caplog)
    message = line.getMessage()
    assert "403" in message and "collector organizations" in message and "ManageOrganizations" in message
    assert line.__dict__["collector"] == "organizations"
    assert V3_TOKEN not in caplog.text

    # Now searches answer 403: usage goes down for the sets that ask searches, not for oncall
    # (user_ids: it asks none); organizations recovers. One line per failing set, not per window.
    caplog.clear()
    rig.faults.update({"paths": [SEARCHES]})
    assert await rig.poll_organizations() is True
    assert {n: await rig.poll("usage", n) for n in names} == {
        "enterprise": [False, False], "platform": [False, False], "oncall": [True, True]}
    samples = await rig.samples()
    assert samples["devin_collector_up"] == {
        labels(collector="usage", org="enterprise"): 0.0, labels(collector="usage", org="platform"): 0.0,
        labels(collector="usage", org="oncall"): 1.0, labels(collector="organizations"): 1.0}
    assert samples["devin_up"] == {labels(org="enterprise"): 0.0, labels(org="platform"): 0.0,
                                   labels(org="oncall"): 1.0}
    lines = warnings_of(caplog)
    assert sorted(r.__dict__["org_set"] for r in lines) == ["enterprise", "platform"]
    for record in lines:
        assert "collector usage" in record.getMessage() and "ViewAccountMetrics" in record.getMessage()
    assert any(r.getMessage() == "poll recovered" and r.__dict__.get("collector") == "organizations"
               for r in caplog.records)
    # The failed sets keep their last good values (all families or none, from one poll).
    assert series(samples, "devin_usage_sessions") == series(before, "devin_usage_sessions")


async def test_devin_up_of_a_set_needs_every_window_of_its_collectors(rigs: Rigs) -> None:
    rig = await rigs.start(THREE_SETS, windows="[1h, 24h]")
    rig.faults.update({"status": 500, "paths": [PRS]})
    assert await rig.poll("usage", "platform", "24h") == [False]  # one window of one call is enough
    rig.faults.update({"status": None})
    samples = await rig.samples()
    assert samples["devin_up"] == {labels(org="enterprise"): 1.0, labels(org="platform"): 0.0,
                                   labels(org="oncall"): 1.0}
    assert samples["devin_collector_up"][labels(collector="usage", org="platform")] == 0.0
    assert samples["devin_collector_last_success_timestamp_seconds"][
        labels(collector="usage", org="platform", window="24h")] == T0.timestamp()
    assert await rig.poll("usage", "platform", "24h") == [True]
    assert (await rig.samples())["devin_up"][labels(org="platform")] == 1.0
