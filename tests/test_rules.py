"""The shipped Prometheus rules pass `promtool check rules` and their `promtool test rules` suites."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "helm" / "devin-usage-exporter" / "files" / "prometheus-rules.yaml"
RULE_TESTS = sorted((ROOT / "tests" / "rules").glob("*.yaml"))

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None,
                                reason="promtool not installed (Debian package prometheus; scripts/test installs it)")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_rule_file_passes_promtool_check_rules() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rule_test_files_exist() -> None:
    assert {p.name for p in RULE_TESTS} >= {"alerts-test.yaml", "recording-test.yaml", "cost-test.yaml"}


def test_every_recording_rule_has_a_promtool_test() -> None:
    import yaml

    groups = yaml.safe_load(RULES.read_text())["groups"]
    tested = "\n".join(p.read_text() for p in RULE_TESTS)
    for rule in (r for g in groups for r in g["rules"] if "record" in r):
        assert rule["record"] in tested, f"recording rule {rule['record']} has no promtool test"


def test_rule_tests_fix_the_group_order() -> None:
    # promtool evaluates groups in map order unless told: an alert could then read a recording
    # rule's result of the previous evaluation, or none, and a test pass or fail by chance.
    import yaml

    groups = [g["name"] for g in yaml.safe_load(RULES.read_text())["groups"]]
    for test_file in RULE_TESTS:
        assert yaml.safe_load(test_file.read_text()).get("group_eval_order") == groups, test_file.name


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_rule_unit_tests_pass(test_file: Path) -> None:
    result = _promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_summary_description_and_runbook() -> None:
    import yaml

    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} >= {
        "DevinPRMergeRateDrop", "DevinExporterDown", "DevinUsageDataStale",
        "DevinAPIRateLimited", "DevinAPIErrors", "DevinExporterAbsent", "DevinACUBudgetProjectedOverrun",
        "DevinACUBudgetNearlyUsed", "DevinQueueHigh", "DevinCollectorDown"}
    readme = (ROOT / "README.md").read_text().lower()
    for alert in alerts:
        annotations = alert["annotations"]
        assert annotations["summary"] and annotations["description"], alert["alert"]
        anchor = annotations["runbook_url"].split("#", 1)[1]
        # The runbook pointer must lead to a README heading that exists.
        assert f"### {alert['alert'].lower()}" in readme and anchor == alert["alert"].lower(), alert["alert"]
        tested = "\n".join(p.read_text() for p in RULE_TESTS)
        assert f"alertname: {alert['alert']}" in tested, f"{alert['alert']} has no promtool test"
