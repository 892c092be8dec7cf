"""The landing page shows each org set's numbers, its budget against the limit, the queue and collector
health, escapes what the API sends, and never shows the key."""

from __future__ import annotations

import html
import re
from typing import Final

from helpers import make_config

from exporter.catalogue.declare import Point
from exporter.config import Config
from exporter.landing import render_landing_page
from exporter.snapshot import ENTERPRISE, Result, Snapshot

TOKEN: Final = "cog_LANDINGLEAK_0123456789"
NOW: Final = 1_800_000_000.0
SETS: Final = """
- name: growth
  org_ids: [org-456]
- name: oncall
  org_ids: [org-456]
  user_ids: [u-1]
"""


def _config() -> Config:
    return make_config("http://127.0.0.1:9", SETS, windows="[24h, 7d]", key=TOKEN, collectors="{}")


def _ok(points: list[Point], at: float = NOW - 8) -> Result:
    return Result().succeeded(points, at)


def _snapshot(config: Config) -> Snapshot:
    snap = Snapshot.empty(config)
    usage = [Point("devin_usage_sessions", 229), Point("devin_usage_prs_opened", 124),
             Point("devin_usage_prs_merged", 62)]
    snap = snap.with_result("growth", ("usage", "24h"), _ok(usage))
    for window, users in (("24h", 8), ("7d", 13)):
        snap = snap.with_result("growth", ("active_users", window), _ok([Point("devin_usage_active_users", users)]))
    consumption = [Point("devin_consumption_acus", 18_500.5)]
    snap = snap.with_result("growth", ("consumption", "billing_cycle"), _ok(consumption))
    snap = snap.with_result("growth", ("usage", "7d"), Result().failed("server_error", NOW - 3))
    orgs = [Point("devin_organization_info", 1, (("org_id", "org-456"), ("org_name", "<b>Growth</b>"))),
            Point("devin_organization_acu_cycle_limit", 20_000, (("org_id", "org-456"),))]
    snap = snap.with_result(ENTERPRISE, ("organizations", None), _ok(orgs))
    queue = [Point("devin_queue_size", 57), *(Point("devin_queue_status", float(s == "high"), (("status", s),))
                                             for s in ("normal", "elevated", "high"))]
    return snap.with_result(ENTERPRISE, ("queue", None), _ok(queue))


def _row(page: str, name: str) -> str:
    match = re.search(rf"<tr><td>{re.escape(name)}<br>.*?</tr>", page, re.DOTALL)
    assert match, f"no row for {name}"
    return match.group(0)


def test_a_row_shows_sessions_merged_ratio_active_users_and_acus_against_the_limit() -> None:
    page = render_landing_page(_snapshot(_config()), NOW)
    row = _row(page, "growth")
    assert ">229<" in row and ">62<" in row and ">50%<" in row  # 62 of 124 opened
    assert ">8<" in row
    assert "18,500.5 ACUs of 20,000" in row and "93%" in row  # over 90%: the bar turns hot
    assert 'class="hot"' in row


def test_health_is_per_collector_and_a_failure_shows_its_reason() -> None:
    row = _row(render_landing_page(_snapshot(_config()), NOW), "growth")
    assert 'class="bad">usage: failed (server_error) 3s ago' in row
    assert 'class="ok">active_users: ok 8s ago' in row  # every window polled fine
    assert 'class="">consumption: not polled yet' in row  # three of its four windows were not


def test_what_the_api_cannot_answer_for_a_set_says_not_published() -> None:
    row = _row(render_landing_page(_snapshot(_config()), NOW), "oncall")
    # v3 active users and consumption take no user_ids together with org_ids.
    assert row.count("not published") == 2


def test_the_queue_and_enterprise_collectors_are_shown() -> None:
    page = render_landing_page(_snapshot(_config()), NOW)
    assert "Devin queue: <b>57</b> sessions, status <b>high</b>" in page
    assert "organizations: ok 8s ago" in page and "queue: ok 8s ago" in page


def test_names_are_escaped_and_the_key_never_shows() -> None:
    config = make_config("http://127.0.0.1:9", "- name: '<script>alert(1)</script>'", key=TOKEN, collectors="{}")
    page = render_landing_page(Snapshot.empty(config), NOW)
    assert "<script>" not in page and html.escape("<script>alert(1)</script>") in page
    assert TOKEN not in render_landing_page(_snapshot(_config()), NOW)
