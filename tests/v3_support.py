"""A rig for the collectors of SPEC §9 to §11: the simulator (both API versions) and an exporter app on
127.0.0.1, sharing one fake wall clock, plus the request log and the simulator's organization list.

Every config polls each schedule exactly once at start-up (`jitter: 0`, interval 1h, `random` 0),
so what a scrape shows is known exactly from the simulator's `expected_*` helpers; later polls are
forced through the poller, never waited for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Final, Literal, Unpack

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import KEY, ConfigOptions, Labels, WallClock, make_config, parse_samples, wait_until

from exporter.config import Config, OrgSet
from exporter.plan import plan_of
from exporter.poller import Poller
from exporter.server import create_app
from exporter.service import Exporter
from exporter.simulator import (
    DEFAULT_ORGANIZATIONS,
    ORGANIZATIONS_KEY,
    REQUESTS_KEY,
    Faults,
    Organization,
    RecordedRequest,
    start_simulator,
)

# Recognisable, so a leak into /metrics or a log is easy to grep for.
V3_TOKEN: Final = "cog_RIGLEAK_0123456789"
V2_KEY: Final = KEY
Samples = dict[str, dict[Labels, float]]


# The collectors of issue 11's tests; consumption, active_users and queue have tests of their own.
USAGE_AND_ORGANIZATIONS: Final = (
    "{consumption: {enabled: false}, active_users: {enabled: false}, queue: {enabled: false}}")


@dataclass
class Rig:
    clock: WallClock
    faults: Faults
    sim: web.AppRunner
    sim_url: str
    exporter: Exporter
    client: TestClient[web.Request, web.Application]

    @property
    def config(self) -> Config:
        return self.exporter.config

    @property
    def poller(self) -> Poller:
        assert self.exporter._poller is not None
        return self.exporter._poller

    def org_set(self, name: str) -> OrgSet:
        return next(s for s in self.config.org_sets if s.name == name)

    def set_names(self) -> list[str]:
        return [s.name for s in self.config.org_sets]

    def requests(self, prefix: str = "/") -> list[RecordedRequest]:
        """What the simulator received on paths under `prefix`, oldest first."""
        log: Sequence[RecordedRequest] = self.sim.app[REQUESTS_KEY]  # type: ignore[index]
        return [r for r in log if r.path.startswith(prefix)]

    def organizations(self) -> list[Organization]:
        """The organizations the simulator lists now."""
        return list(self.sim.app[ORGANIZATIONS_KEY])  # type: ignore[index]

    async def put_organizations(self, organizations: list[dict[str, object]]) -> None:
        """Change the enterprise's organizations as an operator would: PUT /-/organizations."""
        async with aiohttp.ClientSession() as http, http.put(
                f"{self.sim_url}/-/organizations", json=organizations) as response:
            assert response.status == 200, await response.text()

    async def scrape(self) -> str:
        response = await self.client.get("/metrics")
        assert response.status == 200
        return await response.text()

    async def samples(self) -> Samples:
        return parse_samples(await self.scrape())

    def polled(self) -> bool:
        """Every schedule of the running config (discovered sets included) has finished a poll."""
        snap = self.exporter.snapshot
        return all(snap.result(k.org_set, *k.slot).last_attempt is not None for k in plan_of(snap.config).keys)

    async def wait_polled(self, what: str = "every schedule's first poll") -> None:
        await wait_until(self.polled, what=what)

    async def poll(self, collector: str, set_name: str | None = None, window: str | None = None) -> list[bool]:
        """Poll now, as the schedules would: one window, or every window of the set's collector."""
        org_set = self.org_set(set_name) if set_name is not None else None
        keys = [k for k in plan_of(self.config).of(set_name or "")
                if k.collector == collector and (window is None or k.slot[1] == window)]
        assert keys, f"no schedule of {collector} for {set_name} {window}"
        return [await self.poller.poll(self.poller.key(collector, org_set, k.window)) for k in keys]

    async def poll_organizations(self) -> bool:
        return await self.poller.poll(self.poller.key("organizations", None, None))


@dataclass
class Rigs:
    """Starts rigs and stops every one of them on exit (exporter before its upstream)."""

    started: list[Rig] = field(default_factory=list)

    async def start(
        self,
        org_sets: str = "",
        *,
        version: Literal["v3", "v2"] = "v3",
        faults: Faults | None = None,
        clock: WallClock | None = None,
        organizations: Sequence[Organization] = DEFAULT_ORGANIZATIONS,
        build: Callable[[str], Config] | None = None,
        reload: Callable[[], Config] | None = None,
        wait: bool = True,
        **options: Unpack[ConfigOptions],
    ) -> Rig:
        """A rig whose config is `build(simulator URL)`, else `make_config` of `org_sets` with the
        version's credential and the usage and organizations collectors at their defaults unless
        `collectors` says otherwise (the tests of the other collectors turn theirs on)."""
        clock = clock or WallClock()
        faults = faults or Faults()
        sim, base_url = await start_simulator(api_key=V2_KEY, v3_token=V3_TOKEN, faults=faults, clock=clock.datetime,
                                              organizations=organizations)
        try:
            if build is not None:
                config = build(base_url)
            else:
                options.setdefault("key", V3_TOKEN if version == "v3" else V2_KEY)
                options.setdefault("collectors", USAGE_AND_ORGANIZATIONS)
                config = make_config(base_url, org_sets, **options)
        except BaseException:
            await sim.cleanup()
            raise
        exporter = Exporter(config, clock=clock.time, random=lambda: 0.0)
        exporter.exposition.max_lag = 0.0  # a scrape right after a poll shows it
        client = TestClient(TestServer(create_app(exporter, reload), host="127.0.0.1"))
        rig = Rig(clock, faults, sim, base_url, exporter, client)
        self.started.append(rig)
        await client.start_server()
        if wait:
            await rig.wait_polled()
        return rig

    async def __aenter__(self) -> Rigs:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        for rig in reversed(self.started):
            await rig.client.close()  # stops the exporter (cleanup_ctx) before its upstream goes away
            await rig.sim.cleanup()


def series(samples: Samples, prefix: str, *, exclude: Sequence[str] = ()) -> dict[tuple[str, Labels], float]:
    """Every sample whose name starts with `prefix` (but none of `exclude`), keyed by (name, labels)."""
    return {(name, lbls): value for name, values in samples.items()
            if name.startswith(prefix) and not name.startswith(tuple(exclude)) for lbls, value in values.items()}


def of_org(samples: Samples, org: str) -> dict[tuple[str, Labels], float]:
    """Every sample labelled org=`org`, of any family."""
    return {(name, lbls): v for name, values in samples.items() for lbls, v in values.items() if ("org", org) in lbls}


def unix(t: datetime) -> int:
    """Whole Unix seconds, as v3 time bounds are sent."""
    return int(t.timestamp())
