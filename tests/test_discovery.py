"""Organization discovery (SPEC §11): one org set per organization the organizations collector lists.

The simulator's organization list is changed as an operator would change theirs (PUT
/-/organizations); the exporter only notices at its next organizations poll, which the tests force.
"""

from __future__ import annotations

from typing import Final, Literal

import pytest
from helpers import labels, make_config
from v3_support import Rig, Rigs, of_org

from exporter.config import Config
from exporter.simulator import Organization, expected_sessions

ORGANIZATIONS_PATH: Final = {"v3": "/v3/enterprise/organizations", "v2": "/v2/enterprise/organizations"}
SESSIONS_PATH: Final = "/v3/enterprise/metrics/sessions"
LENGTHS: Final = {"1h": 3600, "24h": 86400, "7d": 7 * 86400}
DISCOVERY: Final = "discovery: {organizations: true, labels: {source: api}, windows: [24h, 7d]}"
# Two organizations share a name; one has the name of a configured set; one is excluded below.
ORGS: Final = (
    Organization("org-a", "Data", 5_000),
    Organization("org-b", "Data"),
    Organization("org-123", "Payments", 9_000, 100),
    Organization("org-ops", "Ops", 2_000),
    Organization("org-sandbox", "Sandbox"),
)
CONFIGURED: Final = """
- name: Payments
  org_ids: [org-123]
  windows: [1h]
- name: team-a
  org_ids: [org-a, org-ops]
"""


def discovered(rig: Rig) -> dict[str, tuple[str, ...]]:
    """Discovered set name -> its org_ids."""
    return {s.name: s.org_ids for s in rig.config.discovered_org_sets}


def sessions_in(rig: Rig, org_ids: tuple[str, ...], window: str) -> float:
    """What the simulator serves for these orgs over a trailing window ending now (delay 0)."""
    now = int(rig.clock.time())
    body = expected_sessions(list(org_ids), [], now - LENGTHS[window], now, now=rig.clock.now,
                             enterprise_org_ids=[o.org_id for o in rig.organizations()])
    return float(body["sessions_created_count"])  # type: ignore[arg-type]


def org_requests(rig: Rig, version: str = "v3") -> int:
    return len(rig.requests(ORGANIZATIONS_PATH[version]))


@pytest.mark.parametrize("version", ["v3", "v2"])
async def test_every_organization_becomes_an_org_set_named_by_it_with_its_id_label_and_windows(
    rigs: Rigs, version: Literal["v3", "v2"]
) -> None:
    # No configured org sets at all: discovery makes them.
    rig = await rigs.start("", version=version, windows="[1h]", extra=DISCOVERY)
    listed = rig.organizations()
    assert len(listed) == 6
    assert discovered(rig) == {o.name: (o.org_id,) for o in listed}
    samples = await rig.samples()
    for org in listed:
        org_set = rig.org_set(org.name)
        assert dict(org_set.labels) == {"org_id": org.org_id, "source": "api"}
        assert [w.name for w in org_set.windows] == ["24h", "7d"]  # discovery.windows, not the top-level [1h]
        for window in ("24h", "7d"):
            where = labels(org=org.name, window=window, org_id=org.org_id, source="api")
            assert samples["devin_usage_sessions"][where] == sessions_in(rig, (org.org_id,), window)
        assert samples["devin_up"][labels(org=org.name)] == 1.0
        assert samples["devin_collector_up"][labels(collector="usage", org=org.name)] == 1.0
    # Each set asks for exactly its organization, and the numbers differ between them.
    usage = "/v3/enterprise/metrics/sessions" if version == "v3" else "/v2/enterprise/metrics/usage"
    assert {tuple(r.query["org_ids"]) for r in rig.requests(usage)} == {(o.org_id,) for o in listed}
    assert len({v for v in samples["devin_usage_sessions"].values()}) == 12
    # A set's cycle limit is its organization's (absent where it has none).
    assert samples["devin_acu_cycle_limit"] == {
        labels(org=o.name, org_id=o.org_id, source="api"): float(o.max_cycle_acu_limit)
        for o in listed if o.max_cycle_acu_limit is not None}

    # The landing page lists them like configured sets.
    page = await (await rig.client.get("/")).text()
    for org in listed:
        assert f"<td>{org.name}</td>" in page
        assert f"org_ids: {org.org_id}" in page


async def test_discovered_sets_work_beside_configured_ones_with_the_org_id_rule_and_exclude(rigs: Rigs) -> None:
    rig = await rigs.start(CONFIGURED, organizations=ORGS, windows="[1h, 24h]",
                           extra="discovery: {organizations: true, exclude: [org-sandbox]}")
    # `Payments` is a configured name and `Data` is shared: those get ` (<org_id>)`, every one of
    # them; `Ops` keeps its name; the excluded org gets no set.
    assert discovered(rig) == {"Data (org-a)": ("org-a",), "Data (org-b)": ("org-b",),
                               "Payments (org-123)": ("org-123",), "Ops": ("org-ops",)}
    assert rig.set_names()[:2] == ["Payments", "team-a"] and len(rig.set_names()) == 6
    samples = await rig.samples()
    # The configured sets are untouched: their own windows, filters and no org_id label.
    assert {lbls for lbls in samples["devin_usage_sessions"] if ("org", "Payments") in lbls} == {
        labels(org="Payments", window="1h")}
    assert samples["devin_usage_sessions"][labels(org="team-a", window="24h")] == sessions_in(
        rig, ("org-a", "org-ops"), "24h")
    assert samples["devin_acu_cycle_limit"][labels(org="team-a")] == 7_000.0
    # The discovered ones take the top-level windows without discovery.windows.
    for name, (org_id,) in discovered(rig).items():
        for window in ("1h", "24h"):
            assert samples["devin_usage_sessions"][labels(org=name, window=window, org_id=org_id)] == sessions_in(
                rig, (org_id,), window)
    assert not any(("org_id", "org-sandbox") in lbls for lbls in samples["devin_usage_sessions"])
    # Excluded from discovery only: the organizations collector still lists it.
    assert labels(org_id="org-sandbox", org_name="Sandbox") in samples["devin_organization_info"]


async def test_after_the_next_organizations_poll_new_orgs_poll_vanished_ones_go_and_renamed_ones_move(
    rigs: Rigs,
) -> None:
    rig = await rigs.start(CONFIGURED, organizations=ORGS, windows="[1h]", extra=DISCOVERY)
    before = await rig.samples()
    assert of_org(before, "Ops") and of_org(before, "Data (org-a)")

    # org-ops is renamed to `Data` (now three share it); org-b leaves; org-new arrives.
    await rig.put_organizations([
        {"org_id": "org-a", "name": "Data", "max_cycle_acu_limit": 5_000},
        {"org_id": "org-123", "name": "Payments", "max_cycle_acu_limit": 9_000, "max_session_acu_limit": 100},
        {"org_id": "org-ops", "name": "Data", "max_cycle_acu_limit": 2_000},
        {"org_id": "org-sandbox", "name": "Sandbox"},
        {"org_id": "org-new", "name": "Newcomer", "max_cycle_acu_limit": 1_000},
    ])
    # Nothing changes until the exporter next lists the organizations.
    assert "Ops" in discovered(rig) and "Newcomer" not in discovered(rig)
    sessions_before = len(rig.requests(SESSIONS_PATH))
    assert await rig.poll_organizations() is True
    assert discovered(rig) == {"Data (org-a)": ("org-a",), "Data (org-ops)": ("org-ops",),
                               "Payments (org-123)": ("org-123",), "Sandbox": ("org-sandbox",),
                               "Newcomer": ("org-new",)}
    await rig.wait_polled("the first polls of the new and renamed sets")

    samples = await rig.samples()
    # The newcomer polls, with its id label and limit.
    for window in ("24h", "7d"):
        assert samples["devin_usage_sessions"][labels(org="Newcomer", window=window, org_id="org-new",
                                                      source="api")] == sessions_in(rig, ("org-new",), window)
    assert samples["devin_acu_cycle_limit"][labels(org="Newcomer", org_id="org-new", source="api")] == 1_000.0
    # The vanished org's series are gone, all of them: usage, health, API counters, info.
    assert of_org(samples, "Data (org-b)") == {}
    assert not any(("org_id", "org-b") in lbls for values in samples.values() for lbls in values)
    # The renamed org moved: nothing under its old name, its numbers under the new one.
    assert of_org(samples, "Ops") == {}
    assert samples["devin_usage_sessions"][labels(org="Data (org-ops)", window="24h", org_id="org-ops",
                                                  source="api")] == before["devin_usage_sessions"][
        labels(org="Ops", window="24h", org_id="org-ops", source="api")]
    assert samples["devin_organization_info"][labels(org_id="org-ops", org_name="Data")] == 1.0
    assert labels(org_id="org-ops", org_name="Ops") not in samples["devin_organization_info"]
    # The sets that did not change were not asked again; only the new and renamed ones were.
    asked = [tuple(r.query["org_ids"]) for r in rig.requests(SESSIONS_PATH)[sessions_before:]]
    assert sorted(set(asked)) == [("org-new",), ("org-ops",)]
    # The configured sets keep working beside them.
    assert samples["devin_up"][labels(org="Payments")] == 1.0 and samples["devin_up"][labels(org="team-a")] == 1.0
    page = await (await rig.client.get("/")).text()
    assert "<td>Newcomer</td>" in page and "<td>Ops</td>" not in page


async def test_a_failed_organizations_poll_keeps_the_discovered_sets(rigs: Rigs) -> None:
    rig = await rigs.start("", windows="[1h]", extra=DISCOVERY)
    sets = discovered(rig)
    before = await rig.samples()
    rig.faults.update({"status": 500, "paths": ["/v3/enterprise/organizations"]})
    assert await rig.poll_organizations() is False
    assert discovered(rig) == sets
    after = await rig.samples()
    assert after["devin_usage_sessions"] == before["devin_usage_sessions"]
    assert after["devin_collector_up"][labels(collector="organizations")] == 0.0


def reconfigured(rig: Rig, discovery: str, org_sets: str = CONFIGURED) -> Config:
    return make_config(rig.config.api.base_url, org_sets, key=rig.config.api.api_key.reveal(), collectors="{}",
                       windows="[1h]", extra=discovery)


async def test_a_reload_keeps_discovered_sets_and_applies_new_discovery_settings_at_once(rigs: Rigs) -> None:
    rig = await rigs.start(CONFIGURED, organizations=ORGS, windows="[1h]", extra=DISCOVERY)
    listed, polled = org_requests(rig), len(rig.requests(SESSIONS_PATH))
    sets = discovered(rig)
    before = await rig.samples()

    # The same config again: the same sets, nothing asked anew, the same values.
    assert await rig.exporter.reload(lambda: reconfigured(rig, DISCOVERY)) is True
    assert discovered(rig) == sets
    assert len(rig.requests(SESSIONS_PATH)) == polled
    assert (await rig.samples())["devin_usage_sessions"] == before["devin_usage_sessions"]

    # New labels, windows and exclusions apply without waiting for the next organizations poll.
    changed = "discovery: {organizations: true, labels: {source: sso, tier: gold}, windows: [1h], exclude: [org-b]}"
    assert await rig.exporter.reload(lambda: reconfigured(rig, changed)) is True
    assert discovered(rig) == {"Data": ("org-a",), "Payments (org-123)": ("org-123",), "Ops": ("org-ops",),
                               "Sandbox": ("org-sandbox",)}
    await rig.wait_polled("the discovered sets' new windows")
    assert org_requests(rig) == listed
    samples = await rig.samples()
    for name, (org_id,) in discovered(rig).items():
        assert {lbls for lbls in samples["devin_usage_sessions"] if ("org", name) in lbls} == {
            labels(org=name, window="1h", org_id=org_id, source="sso", tier="gold")}
        assert samples["devin_usage_sessions"][labels(org=name, window="1h", org_id=org_id, source="sso",
                                                      tier="gold")] == sessions_in(rig, (org_id,), "1h")
    # org-b is excluded, so org-a alone is `Data` now; the suffixed names are gone.
    assert of_org(samples, "Data (org-b)") == {} and of_org(samples, "Data (org-a)") == {}

    # Discovery off: the discovered sets go at once, the configured ones stay.
    assert await rig.exporter.reload(lambda: reconfigured(rig, "")) is True
    assert rig.set_names() == ["Payments", "team-a"]
    assert set(dict(lbls)["org"] for lbls in (await rig.samples())["devin_up"]) == {"Payments", "team-a"}

    # And on again: the organizations last listed make their sets at once, without asking anew.
    assert await rig.exporter.reload(lambda: reconfigured(rig, DISCOVERY)) is True
    assert discovered(rig) == sets
    await rig.wait_polled("the rediscovered sets' first polls")
    assert org_requests(rig) == listed


async def test_a_discovered_name_that_is_taken_for_another_reason_is_skipped_not_doubled(rigs: Rigs) -> None:
    # A configured set already has the name the ` (<org_id>)` rule gives: that org gets no set,
    # rather than two series sets under one `org` label.
    org_sets = "- name: Data\n  org_ids: [org-a]\n- name: Data (org-b)\n  org_ids: [org-b]\n"
    rig = await rigs.start(org_sets, organizations=ORGS[:2], windows="[1h]", extra="discovery: {organizations: true}")
    assert discovered(rig) == {"Data (org-a)": ("org-a",)}
    assert rig.set_names() == ["Data", "Data (org-b)", "Data (org-a)"]
    samples = await rig.samples()
    assert samples["devin_up"] == {labels(org=n): 1.0 for n in rig.set_names()}
    # `Data (org-b)` is the configured set's alone: one series per window, its own labels.
    assert {lbls for lbls in samples["devin_usage_sessions"] if ("org", "Data (org-b)") in lbls} == {
        labels(org="Data (org-b)", window="1h")}
