"""What the consumption and queue collectors make of replies the simulator never sends (SPEC §10).

A scripted upstream on 127.0.0.1 answers each path with the body a test gives it, and the whole
exporter polls it: ACUs as numeric strings are published as numbers; anything else that is not a
non-negative number is `invalid_response`, and then nothing of that poll is published and the last
good values stay; a queue status upstream may add later is published as its own series.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final

import pytest
from aiohttp import web
from helpers import T0, WallClock, labels, make_config
from v3_support import V2_KEY, V3_TOKEN, Rig, Rigs, Samples

V3_ORG_DAILY: Final = "/v3/enterprise/consumption/daily/organizations/"
V3_USER_DAILY: Final = "/v3/enterprise/consumption/daily/users/"
V2_DAILY: Final = "/v2/enterprise/consumption/daily"
QUEUE: Final = "/v3/enterprise/queue"
SETS: Final = "- name: growth\n  org_ids: [org-a, org-b]\n"
# One window without the billing cycle, so nothing but the scripted paths is asked.
ONLY_CONSUMPTION: Final = ("{usage: {enabled: false}, organizations: {enabled: false}, active_users: {enabled: false}, "
                           "queue: {enabled: false}, consumption: {windows: [7d]}}")
ONLY_QUEUE: Final = ("{usage: {enabled: false}, organizations: {enabled: false}, active_users: {enabled: false}, "
                     "consumption: {enabled: false}}")
DAY: Final = int(T0.timestamp()) - 10 * 3600  # 08:00 UTC, a billing day's start


@dataclass
class Upstream:
    """A loopback stand-in for the API: each path answers the JSON body set for it, else 404."""

    bodies: dict[str, object] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)  # decoded paths, oldest first
    queries: list[list[str]] = field(default_factory=list)  # the parameter names of each
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(request.path)
        self.queries.append(list(request.query))
        if request.path not in self.bodies:
            return web.json_response({"detail": "Not Found"}, status=404)
        return web.json_response(self.bodies[request.path])


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    scripted = Upstream()
    app = web.Application()
    app.router.add_get("/{tail:.*}", scripted.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        scripted.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield scripted
    finally:
        await runner.cleanup()


@pytest.fixture
async def rigs(upstream: Upstream) -> AsyncIterator[Rigs]:
    # Depends on `upstream`, so the exporters stop before it does.
    async with Rigs() as started:
        yield started


async def start(rigs: Rigs, upstream: Upstream, collectors: str, *, key: str = V3_TOKEN,
                clock: WallClock | None = None, org_sets: str = SETS) -> Rig:
    return await rigs.start(clock=clock, build=lambda _simulator: make_config(
        upstream.url, org_sets, key=key, collectors=collectors))


_SAME: Final = object()


def v3_reply(total: object, products: dict[str, object], day_acus: object = _SAME) -> dict[str, object]:
    """A v3 consumption reply of one billing day (its `acus` the total unless given)."""
    return {"total_acus": total, "consumption_by_date": [
        {"date": DAY, "acus": total if day_acus is _SAME else day_acus, "acus_by_product": products}]}


def growth(samples: Samples, family: str, **own: str) -> float:
    return samples[family][labels(org="growth", window="7d", **own)]


async def test_acus_sent_as_numeric_strings_are_published_as_numbers(rigs: Rigs, upstream: Upstream) -> None:
    upstream.bodies = {
        V3_ORG_DAILY + "org-a": v3_reply("12.5", {"devin": "10.25", "cascade": "2.25"}),
        V3_ORG_DAILY + "org-b": v3_reply(7, {"devin": 7, "cascade": "0"}),  # numbers and strings mixed
    }
    rig = await start(rigs, upstream, ONLY_CONSUMPTION)
    samples = await rig.samples()
    assert growth(samples, "devin_consumption_acus") == 19.5
    assert growth(samples, "devin_consumption_acus_by_product", product="devin") == 17.25
    assert growth(samples, "devin_consumption_acus_by_product", product="cascade") == 2.25
    assert samples["devin_collector_up"] == {labels(collector="consumption", org="growth"): 1.0}
    assert sorted(upstream.seen) == [V3_ORG_DAILY + "org-a", V3_ORG_DAILY + "org-b"]


async def test_v2_acus_sent_as_a_numeric_string_are_published_as_a_number(rigs: Rigs, upstream: Upstream) -> None:
    upstream.bodies = {V2_DAILY: {"total_acus": "1.2e2", "consumption_by_date": {"2026-11-24": "120"}}}
    rig = await start(rigs, upstream, ONLY_CONSUMPTION.replace("queue: {enabled: false}, ", ""), key=V2_KEY)
    samples = await rig.samples()
    assert growth(samples, "devin_consumption_acus") == 120.0
    assert samples["devin_collector_up"] == {labels(collector="consumption", org="growth"): 1.0}
    assert upstream.seen == [V2_DAILY]


# Ids with characters that mean something in a URL: a query, a fragment, a path separator.
ODD_IDS: Final = ("user-1?x=1", "user-2#top", "team/user-3")


@pytest.mark.parametrize("version", ["v3", "v2"])
async def test_each_user_is_asked_by_its_own_id_whatever_characters_it_holds(
    rigs: Rigs, upstream: Upstream, version: str
) -> None:
    prefix = V3_USER_DAILY if version == "v3" else V2_DAILY + "/"
    no_days: object = [] if version == "v3" else {}
    # user-1 and user-2 exist too: asking them instead would be a number for someone else.
    upstream.bodies = {prefix + ident: {"total_acus": acus, "consumption_by_date": no_days}
                       for ident, acus in zip((*ODD_IDS, "user-1", "user-2"), (1, 2, 4, 100, 200), strict=True)}
    rig = await start(rigs, upstream, ONLY_CONSUMPTION.replace("queue: {enabled: false}, ", "")
                      if version == "v2" else ONLY_CONSUMPTION, key=V3_TOKEN if version == "v3" else V2_KEY,
                      org_sets=f"- name: people\n  user_ids: {list(ODD_IDS)}\n")
    assert sorted(upstream.seen) == sorted(prefix + ident for ident in ODD_IDS)
    assert all("x" not in query for query in upstream.queries)
    samples = await rig.samples()
    assert samples["devin_consumption_acus"] == {labels(org="people", window="7d"): 7.0}


NOT_NUMBERS: Final = [
    ("total_acus", "12,5"), ("total_acus", "twelve"), ("total_acus", ""), ("total_acus", "NaN"),
    ("total_acus", "Infinity"), ("total_acus", True), ("total_acus", False), ("total_acus", None),
    ("total_acus", -1), ("total_acus", "-0.5"), ("total_acus", [1]), ("total_acus", {"value": 1}),
    ("product", "12,5"), ("product", True), ("product", None), ("product", -0.25),
    ("day", "n/a"), ("day", None),
]


@pytest.mark.parametrize(("where", "value"), NOT_NUMBERS, ids=[f"{w}={v!r}" for w, v in NOT_NUMBERS])
async def test_acus_that_are_not_a_non_negative_number_fail_the_poll_and_the_last_good_values_stay(
    rigs: Rigs, upstream: Upstream, caplog: pytest.LogCaptureFixture, where: str, value: object
) -> None:
    caplog.set_level(logging.WARNING)
    clock = WallClock()
    upstream.bodies = {V3_ORG_DAILY + "org-a": v3_reply(3.5, {"devin": 3.5}),
                       V3_ORG_DAILY + "org-b": v3_reply(4, {"devin": 4})}
    rig = await start(rigs, upstream, ONLY_CONSUMPTION, clock=clock)
    before = await rig.samples()
    assert growth(before, "devin_consumption_acus") == 7.5

    # org-a's reply changes and is fine; org-b's is broken: nothing of this poll may be published,
    # not org-a's part alone under the set's name.
    upstream.bodies[V3_ORG_DAILY + "org-a"] = v3_reply(100, {"devin": 100})
    upstream.bodies[V3_ORG_DAILY + "org-b"] = (
        v3_reply(value, {"devin": 4}) if where == "total_acus" else
        v3_reply(4, {"devin": 4, "review": value}) if where == "product" else
        v3_reply(4, {"devin": 4}, day_acus=value))
    clock.advance(1800)
    assert await rig.poll("consumption", "growth") == [False]
    samples = await rig.samples()
    assert growth(samples, "devin_consumption_acus") == 7.5
    assert samples["devin_consumption_acus_by_product"] == before["devin_consumption_acus_by_product"]
    assert "review" not in {dict(lbls)["product"] for lbls in samples["devin_consumption_acus_by_product"]}
    assert samples["devin_collector_up"] == {labels(collector="consumption", org="growth"): 0.0}
    assert samples["devin_collector_last_success_timestamp_seconds"] == {
        labels(collector="consumption", org="growth", window="7d"): T0.timestamp()}
    errors = samples["devin_exporter_api_errors_total"]
    assert errors[labels(collector="consumption", org="growth", reason="invalid_response")] == 1.0
    assert sum(errors.values()) == 1.0
    (line,) = [r for r in caplog.records if r.__dict__.get("collector") == "consumption"]
    assert line.__dict__["reason"] == "invalid_response"
    assert ("total_acus" if where == "total_acus" else "acus") in line.getMessage()

    # A good reply again: its values are published.
    upstream.bodies[V3_ORG_DAILY + "org-b"] = v3_reply(4, {"devin": 4})
    assert await rig.poll("consumption", "growth") == [True]
    assert growth(await rig.samples(), "devin_consumption_acus") == 104.0


# --------------------------------------------------------------------------------------------
# The queue's status


def statuses(samples: Samples) -> dict[str, float]:
    return {dict(lbls)["status"]: v for lbls, v in samples["devin_queue_status"].items()}


async def test_a_status_upstream_adds_later_is_its_own_series_and_the_known_ones_are_0(
    rigs: Rigs, upstream: Upstream
) -> None:
    upstream.bodies = {QUEUE: {"queue_size": 4, "status": "paused"}}
    rig = await start(rigs, upstream, ONLY_QUEUE)
    samples = await rig.samples()
    assert samples["devin_queue_size"] == {labels(): 4.0}
    assert statuses(samples) == {"normal": 0.0, "elevated": 0.0, "high": 0.0, "paused": 1.0}

    # Back to a documented status: the three known series, one of them 1.
    upstream.bodies[QUEUE] = {"queue_size": 12, "status": "elevated"}
    assert await rig.poll("queue") == [True]
    samples = await rig.samples()
    assert samples["devin_queue_size"] == {labels(): 12.0}
    assert statuses(samples) == {"normal": 0.0, "elevated": 1.0, "high": 0.0}


MALFORMED_STATUSES: Final = ["High", "", "backed up!", "x" * 40, 3, None, True, ["high"], {"name": "high"}]


@pytest.mark.parametrize("status", MALFORMED_STATUSES, ids=[repr(s) for s in MALFORMED_STATUSES])
async def test_a_malformed_queue_status_is_invalid_response_and_the_last_good_state_stays(
    rigs: Rigs, upstream: Upstream, status: object
) -> None:
    upstream.bodies = {QUEUE: {"queue_size": 60, "status": "high"}}
    rig = await start(rigs, upstream, ONLY_QUEUE)
    before = await rig.samples()
    assert statuses(before) == {"normal": 0.0, "elevated": 0.0, "high": 1.0}

    upstream.bodies[QUEUE] = {"queue_size": 2, "status": status}
    assert await rig.poll("queue") == [False]
    samples = await rig.samples()
    assert samples["devin_queue_size"] == {labels(): 60.0}
    assert statuses(samples) == statuses(before)
    assert samples["devin_collector_up"] == {labels(collector="queue"): 0.0}
    assert samples["devin_exporter_api_errors_total"][labels(collector="queue", reason="invalid_response")] == 1.0
