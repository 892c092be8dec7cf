"""The landing page: what each org set shows now (usage, adoption, cost against its limit, the queue),
the health of every collector, and the running config minus secrets. Server-rendered, no JavaScript."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Final

from exporter import __version__
from exporter.catalogue import COLLECTORS
from exporter.catalogue.consumption import ACUS
from exporter.catalogue.queue import SIZE, STATUS
from exporter.config import OrgSet
from exporter.plan import Plan, ScheduleKey, plan_of
from exporter.snapshot import ENTERPRISE, Result, Snapshot

NONE: Final = "&ndash;"  # an empty cell
# The window a row shows for usage and adoption, in order of preference; else the set's first one.
_HEADLINE_WINDOWS: Final = ("24h", "today", "7d")
_STYLE: Final = (
    "body{font-family:sans-serif;margin:2em;color:#222}td,th{padding:3px 10px;text-align:left;"
    "vertical-align:top}th{background:#eee}tr:nth-child(even) td{background:#fafafa}"
    ".num{text-align:right;font-variant-numeric:tabular-nums}.ok{color:#176117}.bad{color:#a31515}"
    ".bar{display:inline-block;width:120px;height:10px;background:#ddd;vertical-align:middle}"
    ".bar span{display:block;height:10px;background:#2c7be5}.bar .hot{background:#d9822b}"
    ".bar .over{background:#a31515}small{color:#666}"
)


def _values(result: Result | None) -> dict[str, float]:
    """Unlabelled points of a result, by family."""
    if result is None or result.points is None:
        return {}
    return {p.family: p.value for p in result.points if not p.labels}


def _number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return NONE
    return f"{value:,.{digits}f}"


def _pick(keys: list[ScheduleKey], preferred: tuple[str, ...]) -> ScheduleKey | None:
    by_window = {k.slot[1]: k for k in keys}
    for name in preferred:
        if name in by_window:
            return by_window[name]
    return keys[0] if keys else None


def _outcome(result: Result | None, now: float) -> tuple[str, str]:
    """(CSS class, text) of a schedule's latest poll."""
    if result is None or result.last_attempt is None:
        return "", "not polled yet"
    ago = f"{now - result.last_attempt:.0f}s ago"
    return ("ok", f"ok {ago}") if result.ok else ("bad", f"failed ({result.error}) {ago}")


def _health(plan: Plan, snap: Snapshot, owner: str, now: float) -> str:
    """One line per collector: a failing window's outcome if any, else one not polled yet, else ok."""
    e = html.escape
    results = snap.of(owner)
    rank = {"bad": 0, "": 1, "ok": 2}
    worst: dict[str, tuple[str, str]] = {}
    for key in plan.of(owner):
        outcome = _outcome(results.get(key.slot), now)
        if key.collector not in worst or rank[outcome[0]] < rank[worst[key.collector][0]]:
            worst[key.collector] = outcome
    return "<br>".join(f'<span class="{css}">{e(name)}: {e(text)}</span>' for name, (css, text) in worst.items())


def _budget(used: float | None, limit: float | None) -> str:
    if used is None:
        return NONE
    text = f"{_number(used, 1)} ACUs"
    if limit is None or limit <= 0:
        return f"{text}<br><small>no cycle limit</small>"
    share = used / limit
    css = "over" if share >= 1 else "hot" if share >= 0.9 else ""
    width = min(100.0, share * 100)
    return (f'{text} of {_number(limit)}<br><span class="bar" title="{share:.0%} of the cycle limit">'
            f'<span class="{css}" style="width:{width:.0f}%"></span></span> {share:.0%}')


def _row(plan: Plan, snap: Snapshot, org_set: OrgSet, limits: Mapping[str, float | None], now: float) -> str:
    e = html.escape
    results = snap.of(org_set.name)
    keys = plan.of(org_set.name)
    usage = _pick([k for k in keys if k.collector == "usage"], _HEADLINE_WINDOWS)
    users = _pick([k for k in keys if k.collector == "active_users"], _HEADLINE_WINDOWS)
    cost = _pick([k for k in keys if k.collector == "consumption"], ("billing_cycle", "30d"))
    counts = _values(results.get(usage.slot)) if usage else {}
    opened, merged = counts.get("devin_usage_prs_opened"), counts.get("devin_usage_prs_merged")
    ratio = f"{merged / opened:.0%}" if opened and merged is not None else NONE
    active = _values(results.get(users.slot)).get("devin_usage_active_users") if users else None
    used = _values(results.get(cost.slot)).get(ACUS) if cost else None
    filters = ", ".join(filter(None, [
        f"org_ids: {', '.join(org_set.org_ids)}" if org_set.org_ids else "",
        f"user_ids: {', '.join(org_set.user_ids)}" if org_set.user_ids else "",
    ])) or "whole enterprise"

    def window(key: ScheduleKey | None) -> str:
        # No schedule: the collector is off, or the API cannot answer for this set's filters.
        return f"<br><small>{e(key.slot[1] or '')}</small>" if key is not None else "<br><small>not published</small>"

    return (f"<tr><td>{e(org_set.name)}<br><small>{e(filters)}</small></td>"
            f'<td class="num">{_number(counts.get("devin_usage_sessions"))}{window(usage)}</td>'
            f'<td class="num">{_number(merged)}{window(usage)}</td><td class="num">{ratio}</td>'
            f'<td class="num">{_number(active)}{window(users)}</td>'
            f"<td>{_budget(used, limits.get(org_set.name))}{window(cost)}</td>"
            f"<td>{_health(plan, snap, org_set.name, now)}</td></tr>")


def render_landing_page(snap: Snapshot, now: float) -> str:
    """The whole page for the snapshot at `now` (unix time)."""
    e = html.escape
    config = snap.config
    plan = plan_of(config)
    enterprise = snap.of(ENTERPRISE)
    organizations = enterprise.get(("organizations", None))
    points = organizations.points if organizations is not None and organizations.points else ()
    derived = COLLECTORS["organizations"].derived
    limit_of = derived[0].of(points) if points and derived else None
    limits = {s.name: (limit_of(s) if limit_of is not None else None) for s in config.org_sets}
    rows = "".join(_row(plan, snap, s, limits, now) for s in config.org_sets)

    queue = enterprise.get(("queue", None))
    queue_line = ""
    if queue is not None and queue.points:
        size = _values(queue).get(SIZE)
        status = next((dict(p.labels)["status"] for p in queue.points if p.family == STATUS and p.value == 1), "?")
        queue_line = f"<p>Devin queue: <b>{_number(size)}</b> sessions, status <b>{e(status)}</b>.</p>"
    if plan.of(ENTERPRISE):
        queue_line += f"<p>Enterprise-level collectors: {_health(plan, snap, ENTERPRISE, now)}</p>"
    details = []
    sets = {s.name: s for s in config.org_sets}
    for owner in plan.owners:
        for key in plan.of(owner):
            css, text = _outcome(snap.result(owner, *key.slot), now)
            details.append(f"<tr><td>{e(owner if owner in sets else '(enterprise)')}</td><td>{e(key.collector)}</td>"
                           f"<td>{e(key.slot[1]) if key.slot[1] else NONE}</td><td>{key.interval:g}s</td>"
                           f'<td class="{css}">{e(text)}</td></tr>')
    poll = config.poll
    api = config.api
    share = (f" for the key ({api.requests_per_second:g}/s from this replica, 1/{api.rate_share} of it)"
             if api.rate_share > 1 else "")
    discovery = " Organization discovery is on: discovered org sets are listed with the others." \
        if config.discovery.organizations else ""
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Devin usage exporter</title><style>{_STYLE}</style></head>
<body><h1>Devin usage exporter</h1>
<p>Version {e(__version__)}. Polls {e(config.api.base_url)} (API {e(config.api.version)}) in the background;
scrapes never wait on it.{discovery}</p>
<ul><li><a href="metrics">/metrics</a></li><li><a href="healthz">/healthz</a></li>
<li><a href="readyz">/readyz</a></li></ul>
{queue_line}
<h2>Org sets</h2>
<table><tr><th>org set</th><th>sessions</th><th>PRs merged</th><th>merge ratio</th><th>active users</th>
<th>ACUs this cycle</th><th>collectors</th></tr>
{rows}
</table>
<h2>Schedules</h2>
<p>Poll: default interval {poll.interval:g}s, jitter {poll.jitter:g}, delay {poll.delay:g}s,
stale after {poll.stale_after} intervals, time zone {e(poll.timezone)}.
API: timeout {config.api.timeout:g}s, concurrency {config.api.max_concurrency},
{config.api.max_requests_per_second:g} requests/s{share}, {config.api.retries} retries.</p>
<table><tr><th>org set</th><th>collector</th><th>window</th><th>interval</th><th>last poll</th></tr>
{"".join(details)}
</table></body></html>
"""
