"""The consumption, active_users and queue collectors (SPEC §10) end to end against the simulator.

As in tests/test_v3_integration.py, every published value is checked against what the simulator
served for the bounds and filters the exporter really sent: each request is read back from the
simulator's log, the window its bounds mean is worked out here from first principles, and the
simulator's `expected_*` helpers say what that request was answered.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Literal

import pytest
from helpers import KEY, T0, Labels, WallClock, labels, make_config, run_cli, subprocess_env, wait_until
from v3_support import V3_TOKEN, Rig, Rigs, Samples, series, unix

from exporter.config import OrgSet
from exporter.simulator import (
    Faults,
    RecordedRequest,
    expected_active_users,
    expected_consumption_v2,
    expected_consumption_v3,
    expected_cycles_v2,
    expected_cycles_v3,
    expected_queue,
    parse_datetime,
)

# The paths of SPEC §10, written out here (not imported from the catalogue) so a typo in a
# declaration fails these tests instead of being mirrored by them.
V3_DAILY: Final = "/v3/enterprise/consumption/daily"
V3_ORG_DAILY: Final = V3_DAILY + "/organizations/"
V3_USER_DAILY: Final = V3_DAILY + "/users/"
V2_DAILY: Final = "/v2/enterprise/consumption/daily"
ACTIVE_USERS: Final = "/v3/enterprise/metrics/active-users"
QUEUE: Final = "/v3/enterprise/queue"
PRODUCTS: Final = ("cascade", "devin", "review", "terminal")

ONLY_CONSUMPTION: Final = ("{usage: {enabled: false}, organizations: {enabled: false}, "
                           "active_users: {enabled: false}, queue: {enabled: false}}")
ONLY_ACTIVE_USERS: Final = ("{usage: {enabled: false}, organizations: {enabled: false}, "
                            "consumption: {enabled: false}, queue: {enabled: false}}")
ONLY_QUEUE: Final = ("{usage: {enabled: false}, organizations: {enabled: false}, "
                     "consumption: {enabled: false}, active_users: {enabled: false}}")

# Every shape of an org set, with disjoint filters, so each request names the one set it is for:
# the whole enterprise; three organizations (with a static label); one organization (with its own
# windows, for usage and active users); two users; an organization and a user together (no
# consumption endpoint means that).
SETS: Final = """
- name: enterprise
- name: platform
  org_ids: [org-platform-1, org-mobile, org-123]
  labels: {team: platform}
- name: growth
  org_ids: [org-456]
  windows: [1h, 7d, billing_cycle]
- name: people
  user_ids: [user-1, user-2]
- name: oncall
  org_ids: [org-789]
  user_ids: [user-3]
  windows: [24h, today, billing_cycle]
"""
ZONE: Final = "America/Los_Angeles"
DELAY: Final = timedelta(minutes=5)
END: Final = T0 - DELAY  # 2026-11-24T17:55Z, 09:55 in Los Angeles (PST, UTC-8)
# The simulator's billing cycles begin on the 5th at 08:00 UTC; T0 is in November's.
CYCLE_START: Final = datetime(2026, 11, 5, 8, tzinfo=UTC)
# Local midnight in Los Angeles on 24 November (PST, UTC-8).
TODAY: Final = datetime(2026, 11, 24, 8, tzinfo=UTC)
LENGTHS: Final = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}

Key = tuple[str, Labels]


def window_named(start: datetime, end: datetime) -> str:
    """The window these bounds mean, by what each window means (SPEC §4, §10)."""
    assert end == END, f"every window ends at now - delay, not {end}"
    means = {name: END - timedelta(seconds=length) for name, length in LENGTHS.items()}
    means |= {"today": TODAY, "billing_cycle": CYCLE_START}
    (name,) = [n for n, s in means.items() if s == start]
    return name


def scope(org_set: OrgSet, window: str, **own: str) -> Labels:
    return labels(org=org_set.name, window=window, **own, **dict(org_set.labels))


def owner(rig: Rig, *, org_id: str | None = None, user_id: str | None = None) -> OrgSet:
    """The one configured set this organization or user (or, neither: no filter) belongs to."""
    (found,) = [s for s in rig.config.org_sets
                if (org_id in s.org_ids if org_id else user_id in s.user_ids if user_id
                    else not s.org_ids and not s.user_ids)]
    return found


def owner_of_path(rig: Rig, path: str) -> OrgSet:
    """The set a v3 consumption request is for, by its path."""
    ident = path.rsplit("/", 1)[1]
    if path.startswith(V3_ORG_DAILY):
        return owner(rig, org_id=ident)
    if path.startswith(V3_USER_DAILY):
        return owner(rig, user_id=ident)
    assert path == V3_DAILY, path
    return owner(rig)


def window_of_request(request: RecordedRequest) -> str:
    after, before = v3_bounds(request)
    return window_named(datetime.fromtimestamp(after, UTC), datetime.fromtimestamp(before, UTC))


def v3_bounds(request: RecordedRequest) -> tuple[int, int]:
    (after,), (before,) = request.query["time_after"], request.query["time_before"]
    return int(after), int(before)


def expected_v3_consumption(rig: Rig) -> tuple[dict[Key, float], Counter[tuple[str, str]], dict[Key, list[float]]]:
    """What the v3 consumption requests in the log should publish; how many requests each (set,
    window) made; and each (set, window)'s totals per request (to see that they were summed)."""
    totals: dict[Key, float] = defaultdict(float)
    parts: dict[Key, list[float]] = defaultdict(list)
    asked: Counter[tuple[str, str]] = Counter()
    for request in rig.requests(V3_DAILY):
        after, before = v3_bounds(request)
        assert set(request.query) == {"time_after", "time_before"}, "per-id paths carry the filter, nothing else"
        org_set, window = owner_of_path(rig, request.path), window_of_request(request)
        ident = request.path.rsplit("/", 1)[1]
        body = expected_consumption_v3(after, before, now=T0,
                                       org_id=ident if request.path.startswith(V3_ORG_DAILY) else None,
                                       user_id=ident if request.path.startswith(V3_USER_DAILY) else None)
        asked[org_set.name, window] += 1
        total = float(body["total_acus"])  # type: ignore[arg-type]
        totals["devin_consumption_acus", scope(org_set, window)] += total
        parts["devin_consumption_acus", scope(org_set, window)].append(total)
        days = body["consumption_by_date"]
        assert isinstance(days, list)
        for day in days:
            assert isinstance(day, dict) and isinstance(day["acus_by_product"], dict)
            for product, acus in day["acus_by_product"].items():
                totals["devin_consumption_acus_by_product", scope(org_set, window, product=product)] += float(acus)  # type: ignore[arg-type]
    return dict(totals), asked, dict(parts)


def consumption_of(samples: Samples) -> dict[Key, float]:
    return series(samples, "devin_consumption_")


# --------------------------------------------------------------------------------------------
# Consumption on v3


async def test_v3_consumption_is_what_the_simulator_served_summed_over_each_sets_orgs_or_users(rigs: Rigs) -> None:
    rig = await rigs.start(SETS, collectors=ONLY_CONSUMPTION, delay="5m", zone=ZONE)
    samples = await rig.samples()
    assert {r.status for r in rig.requests()} == {200}
    assert {r.path for r in rig.requests()} - {"/v3/enterprise/consumption/cycles"} <= {
        V3_DAILY, *(V3_ORG_DAILY + o for o in ("org-platform-1", "org-mobile", "org-123", "org-456")),
        *(V3_USER_DAILY + u for u in ("user-1", "user-2"))}

    expected, asked, parts = expected_v3_consumption(rig)
    assert consumption_of(samples) == pytest.approx(expected, abs=1e-6)

    # One request per organization of org_ids and per user of user_ids, one for no filters, for
    # each of consumption's default windows (its list replaces the set's own windows: oncall's
    # override does not apply); and none at all for oncall (both filters).
    windows = ("today", "7d", "30d", "billing_cycle")
    assert asked == Counter({(name, w): n for name, n in (("enterprise", 1), ("platform", 3), ("growth", 1),
                                                          ("people", 2)) for w in windows})
    # ... each of its own organizations or users once.
    for org_set in rig.config.org_sets:
        if org_set.org_ids and org_set.user_ids:
            continue
        want = Counter([V3_ORG_DAILY + o for o in org_set.org_ids] + [V3_USER_DAILY + u for u in org_set.user_ids]
                       or [V3_DAILY])
        for window in windows:
            got = Counter(r.path for r in rig.requests(V3_DAILY)
                          if owner_of_path(rig, r.path) == org_set and window_of_request(r) == window)
            assert got == want, (org_set.name, window)
    # Not degenerate: a summed set's value is more than any one of its organizations' or users',
    # and every window of every set differs.
    for key, values in parts.items():
        if dict(key[1])["org"] in ("platform", "people"):
            assert len(values) > 1 and all(0 < v < expected[key] for v in values), key
    assert len({v for (name, _), v in expected.items() if name == "devin_consumption_acus"}) == 16
    assert {dict(lbls)["org"] for lbls in samples["devin_consumption_acus"]} == {
        "enterprise", "platform", "growth", "people"}
    assert V3_TOKEN not in await rig.scrape()


async def test_v3_products_add_up_to_the_total_and_org_and_user_sets_have_devin_acus_only(rigs: Rigs) -> None:
    rig = await rigs.start(SETS, collectors=ONLY_CONSUMPTION, delay="5m", zone=ZONE)
    samples = await rig.samples()
    by_product: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for lbls, value in samples["devin_consumption_acus_by_product"].items():
        where = dict(lbls)
        by_product[where["org"], where["window"]][where["product"]] = value
    totals = {(dict(lbls)["org"], dict(lbls)["window"]): v for lbls, v in samples["devin_consumption_acus"].items()}
    assert by_product.keys() == totals.keys()
    for key, products in by_product.items():
        assert sorted(products) == list(PRODUCTS), key
        assert sum(products.values()) == pytest.approx(totals[key], abs=1e-6), key
        if key[0] == "enterprise":
            # The whole enterprise includes what no organization owns.
            assert all(products[p] > 0 for p in ("cascade", "terminal", "review")), key
        else:
            # Upstream: Cascade, Terminal and review ACUs are not tied to any organization.
            assert products["devin"] == pytest.approx(totals[key], abs=1e-6) and totals[key] > 0, key
            assert {products[p] for p in ("cascade", "terminal", "review")} == {0.0}, key
    # The organizations' Devin ACUs are part of the enterprise's.
    for window in ("today", "7d", "30d", "billing_cycle"):
        assert by_product["enterprise", window]["devin"] > by_product["platform", window]["devin"] + by_product[
            "growth", window]["devin"]


# --------------------------------------------------------------------------------------------
# Consumption on v2


async def test_v2_consumption_sends_org_ids_in_one_request_and_sums_a_request_per_user(rigs: Rigs) -> None:
    rig = await rigs.start(SETS, version="v2", collectors=ONLY_CONSUMPTION, delay="5m", zone=ZONE)
    samples = await rig.samples()
    assert rig.requests("/v3/") == []
    assert {r.status for r in rig.requests()} == {200}

    expected: dict[Key, float] = defaultdict(float)
    asked: Counter[tuple[str, str]] = Counter()
    for request in rig.requests(V2_DAILY):
        org_ids = request.query.get("org_ids", [])
        if request.path == V2_DAILY:
            org_set, user_id = owner(rig, org_id=org_ids[0]) if org_ids else owner(rig), None
            assert tuple(org_ids) == org_set.org_ids  # every organization in the one request
        else:
            user_id = request.path.removeprefix(V2_DAILY + "/")
            org_set = owner(rig, user_id=user_id)
            assert org_ids == []
        start, end = parse_datetime(request.query["start_date"][0]), parse_datetime(request.query["end_date"][0])
        window = window_named(start, end)
        asked[org_set.name, window] += 1
        body = expected_consumption_v2(org_ids, start, end, now=T0, user_id=user_id)
        expected["devin_consumption_acus", scope(org_set, window)] += float(body["total_acus"])  # type: ignore[arg-type]

    windows = ("today", "7d", "30d", "billing_cycle")
    assert asked == Counter({(name, w): n for name, n in (("enterprise", 1), ("platform", 1), ("growth", 1),
                                                          ("people", 2)) for w in windows})
    # Each user of the set once per window.
    for window in ("today", "7d", "30d", "billing_cycle"):
        users = Counter(r.path for r in rig.requests(V2_DAILY + "/") if r.query["start_date"][0] == {
            "today": "2026-11-24T08:00:00Z", "7d": "2026-11-17T17:55:00Z", "30d": "2026-10-25T17:55:00Z",
            "billing_cycle": "2026-11-05T08:00:00Z"}[window])
        assert users == Counter({V2_DAILY + "/user-1": 1, V2_DAILY + "/user-2": 1}), window
    assert consumption_of(samples) == pytest.approx(dict(expected), abs=1e-6)
    assert len(set(expected.values())) == 16
    # v2 has no split by product.
    assert "devin_consumption_acus_by_product" not in samples


# --------------------------------------------------------------------------------------------
# billing_cycle


def current_cycle_start(version: str, now: datetime) -> datetime:
    """The start of the cycle the simulator's cycles endpoint lists as holding `now`."""
    if version == "v3":
        cycles = [(datetime.fromtimestamp(int(str(c["after"])), UTC),
                   datetime.fromtimestamp(int(str(c["before"])), UTC))
                  for c in expected_cycles_v3(now) if isinstance(c, dict)]
    else:
        cycles = [(parse_datetime(str(c["start"])), parse_datetime(str(c["end"])))
                  for c in expected_cycles_v2(now) if isinstance(c, dict)]
    (start,) = [s for s, e in cycles if s <= now < e]
    return start


@pytest.mark.parametrize("version", ["v3", "v2"])
async def test_billing_cycle_consumption_sends_the_current_cycle_from_the_cycles_endpoint(
    rigs: Rigs, version: Literal["v3", "v2"]
) -> None:
    clock = WallClock()
    rig = await rigs.start("- name: growth\n  org_ids: [org-456]\n", version=version, clock=clock,
                           windows="[billing_cycle]", delay="5m",
                           collectors="{active_users: {enabled: false}, queue: {enabled: false}, "
                                      "consumption: {windows: [billing_cycle]}}")
    assert current_cycle_start(version, T0) == CYCLE_START

    def sent(path: str) -> list[dict[str, list[str]]]:
        return [r.query for r in rig.requests(path)]

    if version == "v3":
        assert sent(V3_ORG_DAILY + "org-456") == [
            {"time_after": [str(unix(CYCLE_START))], "time_before": [str(unix(END))]}]
        # Usage on v3 sends the same bounds.
        assert sent("/v3/enterprise/metrics/sessions")[0]["time_after"] == [str(unix(CYCLE_START))]
    else:
        assert sent(V2_DAILY) == [{"start_date": ["2026-11-05T08:00:00Z"], "end_date": ["2026-11-24T17:55:00Z"],
                                   "org_ids": ["org-456"]}]
        # v2 usage keeps sending no dates for billing_cycle (SPEC §4); consumption does send them.
        assert sent("/v2/enterprise/metrics/usage") == [{"org_ids": ["org-456"]}]
    samples = await rig.samples()
    served = (expected_consumption_v3(unix(CYCLE_START), unix(END), now=T0, org_id="org-456") if version == "v3"
              else expected_consumption_v2(["org-456"], CYCLE_START, END, now=T0))
    assert samples["devin_consumption_acus"] == {labels(org="growth", window="billing_cycle"): served["total_acus"]}

    # Past the cycle's end the next poll sends the new cycle's start, as the cycles endpoint lists it.
    clock.now = datetime(2026, 12, 6, 12, tzinfo=UTC)
    assert await rig.poll("consumption", "growth") == [True]
    new_start, new_end = datetime(2026, 12, 5, 8, tzinfo=UTC), clock.now - DELAY
    assert current_cycle_start(version, clock.now) == new_start
    latest = rig.requests(V3_ORG_DAILY if version == "v3" else V2_DAILY)[-1]
    if version == "v3":
        assert latest.query == {"time_after": [str(unix(new_start))], "time_before": [str(unix(new_end))]}
        served = expected_consumption_v3(unix(new_start), unix(new_end), now=clock.now, org_id="org-456")
    else:
        assert latest.query == {"start_date": ["2026-12-05T08:00:00Z"], "end_date": ["2026-12-06T11:55:00Z"],
                                "org_ids": ["org-456"]}
        served = expected_consumption_v2(["org-456"], new_start, new_end, now=clock.now)
    assert (await rig.samples())["devin_consumption_acus"] == {
        labels(org="growth", window="billing_cycle"): served["total_acus"]}


@pytest.mark.parametrize("version", ["v3", "v2"])
async def test_a_start_with_billing_cycle_windows_asks_the_cycles_endpoint_once(
    rigs: Rigs, version: Literal["v3", "v2"]
) -> None:
    # Every schedule is due at once (jitter 0): the billing_cycle windows wait for the organizations
    # poll, which lists the cycles anyway, instead of asking the same thing moments before it.
    rig = await rigs.start("- name: growth\n  org_ids: [org-456]\n- name: mobile\n  org_ids: [org-mobile]\n",
                           version=version, windows="[billing_cycle, 7d]",
                           collectors="{active_users: {enabled: false}, queue: {enabled: false}, "
                                      "consumption: {windows: [billing_cycle]}}")
    cycles = f"/{version}/enterprise/consumption/cycles"
    assert len([r for r in rig.requests(cycles) if "after" not in r.query]) == 1  # one listing (v3: of pages)
    daily = rig.requests(V3_ORG_DAILY if version == "v3" else V2_DAILY)
    assert len(daily) == 2 and all(r.status == 200 for r in daily)


@pytest.mark.parametrize("version", ["v3", "v2"])
async def test_billing_cycle_windows_just_after_a_new_cycle_begins_ask_an_empty_window_not_a_reversed_one(
    rigs: Rigs, version: Literal["v3", "v2"]
) -> None:
    # Two minutes into December's cycle, with a five-minute delay: the settled part of the
    # cycle (up to now - delay) is still empty.
    new_start = datetime(2026, 12, 5, 8, tzinfo=UTC)
    clock = WallClock(new_start + timedelta(minutes=2))
    assert current_cycle_start(version, clock.now) == new_start
    rig = await rigs.start("- name: growth\n  org_ids: [org-456]\n", version=version, clock=clock, delay="5m",
                           windows="[billing_cycle]", collectors="{queue: {enabled: false}, "
                           "consumption: {windows: [billing_cycle]}}" if version == "v3" else (
                               "{consumption: {windows: [billing_cycle]}}"))
    bounded = [r for r in rig.requests() if "/consumption/daily" in r.path or "/metrics/" in r.path]
    assert bounded and {r.status for r in bounded} == {200}
    samples = await rig.samples()
    assert set(samples["devin_collector_up"].values()) == {1.0}
    assert samples["devin_consumption_acus"] == {labels(org="growth", window="billing_cycle"): 0.0}
    settled = clock.now - DELAY
    for request in bounded:
        if version == "v3":
            assert v3_bounds(request) == (unix(settled), unix(settled)), request
        elif request.path == V2_DAILY:
            assert request.query["start_date"] == request.query["end_date"] == ["2026-12-05T07:57:00Z"]

    # Once the delay has passed, the window is the new cycle so far.
    clock.now = new_start + timedelta(minutes=20)
    assert await rig.poll("consumption", "growth") == [True]
    latest = rig.requests(V3_ORG_DAILY if version == "v3" else V2_DAILY)[-1]
    served = (expected_consumption_v3(unix(new_start), unix(clock.now - DELAY), now=clock.now, org_id="org-456")
              if version == "v3" else expected_consumption_v2(["org-456"], new_start, clock.now - DELAY,
                                                               now=clock.now))
    assert (latest.query.get("time_after") or latest.query["start_date"]) in (
        [str(unix(new_start))], ["2026-12-05T08:00:00Z"])
    assert (await rig.samples())["devin_consumption_acus"] == {
        labels(org="growth", window="billing_cycle"): served["total_acus"]}
    assert float(served["total_acus"]) > 0  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Active users


async def active_users_rig(rigs: Rigs, thresholds: str = "") -> tuple[Rig, dict[Key, float]]:
    """A rig polling only active users, and what the simulator served each of its requests."""
    collectors = ONLY_ACTIVE_USERS[:-1] + f", active_users: {{{thresholds}}}}}" if thresholds else ONLY_ACTIVE_USERS
    rig = await rigs.start(SETS, collectors=collectors, windows="[1h, 7d, 30d]", delay="5m", zone=ZONE)
    settings = rig.config.collector("active_users")
    expected: dict[Key, float] = {}
    for request in rig.requests(ACTIVE_USERS):
        after, before = v3_bounds(request)
        org_ids = request.query.get("org_ids", [])
        org_set = owner(rig, org_id=org_ids[0]) if org_ids else owner(rig)
        assert tuple(org_ids) == org_set.org_ids and "user_ids" not in request.query
        # The collector's thresholds reach every request.
        assert request.query["min_sessions"] == [str(settings.min_sessions)]
        assert request.query["min_searches"] == [str(settings.min_searches)]
        window = window_named(datetime.fromtimestamp(after, UTC), datetime.fromtimestamp(before, UTC))
        body = expected_active_users(org_ids, after, before, now=T0, min_sessions=settings.min_sessions,
                                     min_searches=settings.min_searches)
        key = ("devin_usage_active_users", scope(org_set, window))
        assert key not in expected, f"{key} asked twice"
        expected[key] = float(body["active_users"])  # type: ignore[arg-type]
    return rig, expected


async def test_active_users_are_what_the_simulator_served_and_a_set_with_user_ids_gets_none(rigs: Rigs) -> None:
    rig, expected = await active_users_rig(rigs)
    samples = await rig.samples()
    assert series(samples, "devin_usage_active_users") == expected
    # One request per (set, window) of the sets without user_ids, growth's own windows its billing
    # cycle among them (from the cycle's start, see window_named).
    assert len(rig.requests(ACTIVE_USERS)) == 3 * 3
    assert labels(org="growth", window="billing_cycle") in samples["devin_usage_active_users"]
    assert {dict(lbls)["org"] for lbls in samples["devin_usage_active_users"]} == {"enterprise", "platform", "growth"}
    assert not any(dict(lbls)["org"] in ("people", "oncall") for lbls in samples["devin_collector_up"])
    # Not degenerate: the counts differ by set and window.
    assert len(expected) == 9 and len(set(expected.values())) >= 7


async def test_min_sessions_and_min_searches_reach_the_request_and_change_the_count(rigs: Rigs) -> None:
    default_rig, default = await active_users_rig(rigs)
    strict_rig, strict = await active_users_rig(rigs, "min_sessions: 10, min_searches: 10")
    # 0 is a threshold too (everyone counts), not a value to leave out of the request.
    zero_rig, zero = await active_users_rig(rigs, "min_sessions: 0, min_searches: 5")
    for rig, sessions, searches in ((default_rig, "1", "1"), (strict_rig, "10", "10"), (zero_rig, "0", "5")):
        assert {(r.query["min_sessions"][0], r.query["min_searches"][0]) for r in rig.requests(ACTIVE_USERS)} == {
            (sessions, searches)}
    for rig, expected in ((default_rig, default), (strict_rig, strict), (zero_rig, zero)):
        assert series(await rig.samples(), "devin_usage_active_users") == expected
    assert strict.keys() == default.keys() == zero.keys()
    for key in default:
        where = dict(key[1])
        assert strict[key] <= default[key] < zero[key], key
        if where["org"] in ("enterprise", "platform") and where["window"] != "1h":
            assert strict[key] < default[key], key


async def test_a_reload_that_changes_the_thresholds_asks_again_with_the_new_ones(rigs: Rigs) -> None:
    rig, default = await active_users_rig(rigs)
    asked = len(rig.requests(ACTIVE_USERS))
    strict = ONLY_ACTIVE_USERS[:-1] + ", active_users: {min_sessions: 10, min_searches: 10}}"
    assert await rig.exporter.reload(lambda: make_config(rig.sim_url, SETS, collectors=strict, key=V3_TOKEN,
                                                         windows="[1h, 7d, 30d]", delay="5m", zone=ZONE))
    await wait_until(lambda: len(rig.requests(ACTIVE_USERS)) == 2 * asked and rig.polled(),
                     what="every active users schedule polled again")
    again = rig.requests(ACTIVE_USERS)[asked:]
    assert {(r.query["min_sessions"][0], r.query["min_searches"][0]) for r in again} == {("10", "10")}
    published = series(await rig.samples(), "devin_usage_active_users")
    assert published.keys() == default.keys()
    for key, value in published.items():
        lbls = dict(key[1])
        request = next(r for r in again if tuple(r.query.get("org_ids", ())) == rig.org_set(lbls["org"]).org_ids
                       and window_of_request(r) == lbls["window"])
        body = expected_active_users(request.query.get("org_ids", []), *v3_bounds(request), now=T0,
                                     min_sessions=10, min_searches=10)
        assert value == body["active_users"], key
    week = ("devin_usage_active_users", labels(org="enterprise", window="7d"))
    assert published[week] < default[week]


# --------------------------------------------------------------------------------------------
# The queue


def queue_statuses(samples: Samples) -> dict[str, float]:
    return {dict(lbls)["status"]: v for lbls, v in samples["devin_queue_status"].items()}


async def test_the_queue_follows_the_simulator_through_a_day_with_exactly_one_status_set(rigs: Rigs) -> None:
    clock = WallClock()
    rig = await rigs.start("- name: enterprise\n", clock=clock, collectors=ONLY_QUEUE)
    seen: set[str] = set()
    for minutes in range(0, 24 * 60, 20):
        if minutes:
            clock.now = T0 + timedelta(minutes=minutes)
            assert await rig.poll("queue") == [True]
        samples = await rig.samples()
        served = expected_queue(clock.now)
        assert samples["devin_queue_size"] == {labels(): float(served["queue_size"])}  # type: ignore[arg-type]
        statuses = queue_statuses(samples)
        # A state set of the three documented statuses: the current one 1, the others 0.
        assert statuses == {s: 1.0 if s == served["status"] else 0.0 for s in ("normal", "elevated", "high")}
        seen.add(str(served["status"]))
    assert seen == {"normal", "elevated", "high"}, "the day went through every status"
    # The queue is enterprise-wide: no org or window label, one request per poll.
    assert len(rig.requests(QUEUE)) == 72
    assert all(r.query == {} for r in rig.requests(QUEUE))
    assert (await rig.samples())["devin_collector_up"] == {labels(collector="queue"): 1.0}


# --------------------------------------------------------------------------------------------
# What is not published


@pytest.mark.parametrize("version", ["v3", "v2"])
async def test_a_set_with_org_ids_and_user_ids_gets_no_consumption_and_asks_no_consumption_path(
    rigs: Rigs, version: Literal["v3", "v2"], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rig = await rigs.start("- name: oncall\n  org_ids: [org-789]\n  user_ids: [user-3]\n"
                           "- name: growth\n  org_ids: [org-456]\n", version=version,
                           collectors="{organizations: {enabled: false}}")
    samples = await rig.samples()
    daily = V3_DAILY if version == "v3" else V2_DAILY
    growth_paths = {V3_ORG_DAILY + "org-456"} if version == "v3" else {V2_DAILY}
    assert {r.path for r in rig.requests(daily)} == growth_paths
    assert all(r.query.get("org_ids", ["org-456"]) == ["org-456"] for r in rig.requests(daily))
    assert not any("user-3" in r.path or "org-789" in r.path for r in rig.requests())
    assert {dict(lbls)["org"] for lbls in samples["devin_consumption_acus"]} == {"growth"}
    assert labels(collector="consumption", org="oncall") not in samples["devin_collector_up"]
    # Its other collectors are published (usage takes both filters, on both versions).
    assert samples["devin_collector_up"][labels(collector="usage", org="oncall")] == 1.0
    assert samples["devin_up"][labels(org="oncall")] == 1.0
    # The start-up log says so, once.
    notes = [r.getMessage() for r in caplog.records if "consumption publishes nothing" in r.getMessage()]
    assert notes == ["org set 'oncall': collector consumption publishes nothing: the API cannot filter it by "
                     "org_ids and user_ids together"]


def test_check_config_notes_every_set_and_collector_that_publishes_nothing(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("org_sets:\n" + "".join(f"  {line}\n" for line in SETS.strip().splitlines()))
    notes = {}
    for version, key in (("v3", V3_TOKEN), ("v2", KEY)):
        result = run_cli("--check-config", "--config", str(tmp_path / "c.yaml"),
                         env=subprocess_env(DEVIN_API_KEY=key))
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert key not in result.stdout
        summary, *notes[version] = result.stdout.splitlines()
        assert f"API {version}" in summary
    consumption = ("note: org set 'oncall': collector consumption publishes nothing: the API cannot filter it by "
                   "org_ids and user_ids together")
    assert notes["v3"] == [
        "note: org set 'people': collector usage does not publish devin_usage_searches: the API cannot filter "
        "them by user_ids",
        "note: org set 'oncall': collector usage does not publish devin_usage_searches: the API cannot filter "
        "them by user_ids",
        "note: org set 'people': collector active_users publishes nothing: the API cannot filter it by user_ids",
        "note: org set 'oncall': collector active_users publishes nothing: the API cannot filter it by user_ids",
        consumption]
    # On v2: usage takes both filters and active_users is off; consumption is the same.
    assert notes["v2"] == [consumption]


# --------------------------------------------------------------------------------------------
# A service user without ViewAccountConsumption


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_403_on_consumption_downs_only_consumption_with_one_warning_per_set_naming_the_permission(
    rigs: Rigs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # From the start, as a service user created without the permission would see it.
    faults = Faults(status=403, paths=[V3_DAILY])
    rig = await rigs.start(SETS, faults=faults, collectors="{}", windows="[1h, 24h]", delay="5m", zone=ZONE)
    samples = await rig.samples()
    assert {r.status for r in rig.requests(V3_DAILY)} == {403}
    assert {r.status for r in rig.requests() if not r.path.startswith(V3_DAILY)} == {200}

    consuming = ("enterprise", "platform", "growth", "people")  # oncall has no consumption schedule
    up = samples["devin_collector_up"]
    assert {dict(lbls)["org"] for lbls, v in up.items() if ("collector", "consumption") in lbls} == set(consuming)
    assert {lbls: v for lbls, v in up.items() if ("collector", "consumption") in lbls} == {
        labels(collector="consumption", org=n): 0.0 for n in consuming}
    # Every other collector of every set, and the enterprise-level ones, work and are up.
    others = {lbls: v for lbls, v in up.items() if ("collector", "consumption") not in lbls}
    assert {dict(lbls)["collector"] for lbls in others} == {"usage", "active_users", "organizations", "queue"}
    assert set(others.values()) == {1.0}
    assert samples["devin_up"] == {labels(org=n): 0.0 for n in consuming} | {labels(org="oncall"): 1.0}
    assert "devin_consumption_acus" not in samples
    assert samples["devin_usage_sessions"] and samples["devin_usage_active_users"] and samples["devin_queue_size"]
    assert samples["devin_billing_cycle_start_timestamp_seconds"] == {labels(): CYCLE_START.timestamp()}

    # One warning per org set, however many windows and per-org requests failed, naming the permission.
    lines = warnings_of(caplog)
    assert sorted(r.__dict__["org_set"] for r in lines) == sorted(consuming)
    for record in lines:
        message = record.getMessage()
        assert record.__dict__["collector"] == "consumption"
        assert "403" in message and "collector consumption" in message and "ViewAccountConsumption" in message
    # Failing again says nothing new.
    caplog.clear()
    for name in consuming:
        assert set(await rig.poll("consumption", name)) == {False}
    assert warnings_of(caplog) == []
    assert V3_TOKEN not in caplog.text and V3_TOKEN not in await rig.scrape()
    errors = (await rig.samples())["devin_exporter_api_errors_total"]
    # The platform set asked once per organization, per window, per poll: 3 x 4 x 2 (no retries on 403).
    assert errors[labels(collector="consumption", org="platform", reason="auth")] == 3 * 4 * 2

    # The permission granted: the next poll recovers, with a line saying so.
    faults.update({"status": None})
    caplog.clear()
    for name in consuming:
        assert set(await rig.poll("consumption", name)) == {True}
    samples = await rig.samples()
    assert {dict(lbls)["org"] for lbls in samples["devin_consumption_acus"]} == set(consuming)
    assert set(samples["devin_collector_up"].values()) == {1.0}
    assert sorted(r.__dict__["org_set"] for r in caplog.records if r.getMessage() == "poll recovered") == sorted(
        consuming)


# --------------------------------------------------------------------------------------------
# v3-only collectors on v2


async def test_v3_only_collectors_left_at_their_defaults_on_v2_ask_nothing_and_say_so_once(
    rigs: Rigs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rig = await rigs.start(SETS, version="v2", collectors="{}", delay="5m", zone=ZONE)
    samples = await rig.samples()
    assert rig.requests("/v3/") == []
    assert {r.path.rsplit("/", 1)[0] if "/daily/" in r.path else r.path for r in rig.requests()} == {
        "/v2/enterprise/metrics/usage", "/v2/enterprise/organizations", "/v2/enterprise/consumption/cycles",
        V2_DAILY}
    assert {dict(lbls)["collector"] for lbls in samples["devin_collector_up"]} == {
        "usage", "consumption", "organizations"}
    assert not any(name.startswith(("devin_queue_", "devin_usage_active_users")) for name in samples)
    messages = Counter(r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    for name in ("active_users", "queue"):
        lines = [m for m in messages if name in m and "v3" in m]
        assert lines == [f"collector {name} is v3-only; off on API v2"]
        assert messages[lines[0]] == 1
