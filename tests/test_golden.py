"""One golden exposition per collector and API version (DESIGN.md, "Tests that keep one place true").

Each case runs the exporter with that one collector against the simulator at a fixed clock and
compares its `/metrics` with tests/golden/<collector>_<version>.prom, parsed: every family's type
and HELP, every sample's name, labels and value. Left out, because they differ from run to run or
machine to machine: process_* and python_*, the request latency histogram and build_info (its
python_version label). Any other drift fails, a renamed label as much as a changed value.

To regenerate after an intended change:

    UPDATE_GOLDEN=1 /work/venv/bin/python -m pytest -q -p no:cacheprovider tests/test_golden.py

rewrites the files from live output and then fails on purpose, naming them, so a run with the
variable set never passes silently. Read `git diff tests/golden` line by line before committing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import pytest
from helpers import T0, Labels
from prometheus_client.parser import text_string_to_metric_families
from v3_support import Rigs

GOLDEN: Final = Path(__file__).parent / "golden"
VOLATILE: Final = ("process_", "python_", "devin_exporter_api_request_duration_seconds", "devin_exporter_build_info")
COLLECTORS: Final = ("usage", "organizations", "active_users", "consumption", "queue")
# Every other collector off, so a collector added later leaves these files alone.
ONLY: Final = {name: "{" + ", ".join(f"{other}: {{enabled: false}}" for other in COLLECTORS if other != name) + "}"
               for name in COLLECTORS}
# Each collector on each API version it has.
CASES: Final = (("usage", "v3"), ("usage", "v2"), ("organizations", "v3"), ("organizations", "v2"),
                ("consumption", "v3"), ("consumption", "v2"), ("active_users", "v3"), ("queue", "v3"))
# The three shapes of an org set: the whole enterprise; organizations with static labels (both
# have a cycle limit); an organization with users, over calendar windows and the billing cycle.
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
  windows: [24h, today, billing_cycle]
"""

Family = tuple[str, str, dict[tuple[str, Labels], float]]  # type, help, samples


def stable_text(exposition: str) -> str:
    """The exposition as served, minus the blocks of the volatile families."""
    kept: list[str] = []
    keep = True
    for line in exposition.splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            keep = not line.split(" ", 3)[2].startswith(VOLATILE)
        if keep:
            kept.append(line)
    return "\n".join(kept) + "\n"


def parsed(text: str) -> dict[str, Family]:
    families: dict[str, Family] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith(VOLATILE):
            continue
        samples = {(s.name, frozenset(s.labels.items())): s.value for s in family.samples}
        assert len(samples) == len(family.samples), f"{family.name}: a sample listed twice"
        families[family.name] = (family.type, family.documentation, samples)
    return families


def drift(want: dict[str, Family], got: dict[str, Family]) -> list[str]:
    """Every difference, one line each, for a failure message a person can act on."""
    lines = [f"family {n} missing" for n in sorted(want.keys() - got.keys())]
    lines += [f"family {n} not in the golden file" for n in sorted(got.keys() - want.keys())]
    for name in sorted(want.keys() & got.keys()):
        (want_type, want_help, want_samples), (got_type, got_help, got_samples) = want[name], got[name]
        if want_type != got_type:
            lines.append(f"{name}: type {got_type}, golden {want_type}")
        if want_help != got_help:
            lines.append(f"{name}: HELP {got_help!r}, golden {want_help!r}")
        for key in sorted(want_samples.keys() | got_samples.keys(), key=repr):
            sample = f"{key[0]}{{{', '.join(f'{k}={v!r}' for k, v in sorted(key[1]))}}}"
            if key not in got_samples:
                lines.append(f"{sample} missing (golden {want_samples[key]})")
            elif key not in want_samples:
                lines.append(f"{sample} = {got_samples[key]} not in the golden file")
            elif want_samples[key] != got_samples[key]:
                lines.append(f"{sample} = {got_samples[key]}, golden {want_samples[key]}")
    return lines


@pytest.mark.parametrize(("collector", "version"), CASES, ids=[f"{c}_{v}" for c, v in CASES])
async def test_exposition_matches_its_golden_file(rigs: Rigs, collector: str, version: str) -> None:
    rig = await rigs.start(SETS, version="v3" if version == "v3" else "v2", collectors=ONLY[collector],
                           windows="[1h, 7d]", zone="America/Los_Angeles")
    assert rig.exporter.clocks.wall() == T0.timestamp()
    live = stable_text(await rig.scrape())
    path = GOLDEN / f"{collector}_{version}.prom"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(live)
        pytest.fail(f"rewrote {path.relative_to(GOLDEN.parent.parent)} from live output; read `git diff "
                    "tests/golden` by eye, commit it, and run again without UPDATE_GOLDEN")
    assert path.is_file(), f"no {path.name}: run with UPDATE_GOLDEN=1 to make it, then check it by eye"
    differences = drift(parsed(path.read_text()), parsed(live))
    assert not differences, f"{path.name} drifted ({len(differences)}):\n" + "\n".join(differences)


def test_the_comparison_sees_a_changed_value_a_changed_label_and_a_missing_series() -> None:
    golden = (GOLDEN / "usage_v3.prom").read_text()
    sample = next(line for line in golden.splitlines() if line.startswith('devin_usage_sessions{org="platform"'))
    labels, value = sample.rsplit(" ", 1)
    for changed in (f"{labels} {float(value) + 1}", labels.replace('team="platform"', 'team="other"') + f" {value}"):
        assert drift(parsed(golden), parsed(golden.replace(sample, changed))), changed
    assert drift(parsed(golden), parsed(golden.replace(sample + "\n", "")))
    assert not drift(parsed(golden), parsed(golden))
    # The volatile families are really left out, and nothing else is.
    assert not any(name.startswith(VOLATILE) for name in parsed(golden))
    assert {"devin_up", "devin_collector_up", "devin_exporter_api_requests", "devin_exporter_api_info",
            "devin_usage_sessions_by_origin"} <= parsed(golden).keys()


def golden_samples(name: str) -> dict[str, dict[Labels, float]]:
    out: dict[str, dict[Labels, float]] = {}
    for _, _, samples in parsed((GOLDEN / name).read_text()).values():
        for (sample, lbls), value in samples.items():
            out.setdefault(sample, {})[lbls] = value
    return out


def test_the_captured_cost_and_adoption_files_agree_with_themselves() -> None:
    """What reading the files by eye checks, so a file regenerated from a broken build cannot pass
    review unnoticed: the products of each set and window add up to its total, and v2 and v3 (the
    same simulated enterprise) publish the same totals; the queue's state set has one 1, the status
    its size means."""
    v3, v2 = golden_samples("consumption_v3.prom"), golden_samples("consumption_v2.prom")
    totals = v3["devin_consumption_acus"]
    assert totals.keys() == v2["devin_consumption_acus"].keys()
    assert {dict(lbls)["org"] for lbls in totals} == {"enterprise", "platform", "payments"}  # not oncall
    for lbls, total in totals.items():
        assert v2["devin_consumption_acus"][lbls] == pytest.approx(total, abs=1e-6)
        products = {dict(p)["product"]: v for p, v in v3["devin_consumption_acus_by_product"].items()
                    if p - {("product", dict(p)["product"])} == lbls}
        assert sorted(products) == ["cascade", "devin", "review", "terminal"], lbls
        assert sum(products.values()) == pytest.approx(total, abs=1e-6), lbls
        assert total > 0
    assert "devin_consumption_acus_by_product" not in v2

    active = golden_samples("active_users_v3.prom")["devin_usage_active_users"]
    assert {dict(lbls)["org"] for lbls in active} == {"enterprise", "platform", "payments"}  # not oncall

    queue = golden_samples("queue_v3.prom")
    (size,) = queue["devin_queue_size"].values()
    statuses = {dict(lbls)["status"]: v for lbls, v in queue["devin_queue_status"].items()}
    current = "normal" if size <= 10 else "elevated" if size <= 50 else "high"
    assert statuses == {s: 1.0 if s == current else 0.0 for s in ("normal", "elevated", "high")}
