"""The running exporter: one HTTP session and transport, the poller, discovery and the registry, with reload."""

from __future__ import annotations

import asyncio
import gc
import logging
import random as random_module
import time
from collections.abc import Awaitable, Callable

import aiohttp
from prometheus_client import CollectorRegistry

from exporter.catalogue.organizations import organizations
from exporter.clocks import Clocks
from exporter.collector import ApiStats, ExporterCollector, ReloadStatus, build_registry
from exporter.config import Config, ConfigError, OrgSet
from exporter.discovery import discovered_sets
from exporter.exposition import Exposition
from exporter.plan import ScheduleKey, plan_of, prepare
from exporter.poller import Poller, ScheduleChange, schedule_change
from exporter.snapshot import ENTERPRISE, Result, Snapshot
from exporter.transport import Transport, new_session

log = logging.getLogger(__name__)


class Exporter:
    """Wires client → poller → snapshot → registry for one process; the server and `--once` share it."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        random: Callable[[], float] = random_module.random,
        freeze_gc: bool = False,
    ) -> None:
        self._initial_config = config
        self._base = config  # the config as loaded: discovered org sets are added to it at run time
        self._discovered: tuple[OrgSet, ...] = ()
        self._organizations: list[tuple[str, str]] | None = None  # the latest organizations list
        self.clocks = Clocks(wall=clock, monotonic=monotonic, sleep=sleep, random=random)
        self._clock = clock
        self.stats = ApiStats()
        self._track(config)
        self.reload_status = ReloadStatus(successful=True, last_success=clock())
        self.last_reload_error: str | None = None  # the one-line reason the last reload was rejected
        self._reloading = asyncio.Lock()
        self._poller: Poller | None = None
        self._was_ready = False
        # The daemon moves what is alive into the garbage collector's permanent generation once the
        # first poll cycle is done and after each reload (see _freeze); tests and benchmarks in one
        # process with other work leave it alone.
        self._freeze_gc = freeze_gc
        self._unpolled: set[ScheduleKey] | None = None  # the schedules the first cycle has yet to poll
        self._session: aiohttp.ClientSession | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._empty = Snapshot.empty(config)  # one object: cached renderings stay valid until polling starts
        collector = ExporterCollector(lambda: self.snapshot, self.stats, self.reload_status, clock)
        self.registry: CollectorRegistry = build_registry(collector)
        # /metrics renders from bytes cached per snapshot change, not from the registry per scrape.
        self.exposition = Exposition(collector, lambda: self.snapshot, self.stats, self.registry, clock=clock,
                                     monotonic=monotonic)

    @property
    def snapshot(self) -> Snapshot:
        if self._poller is None:
            return self._empty
        return self._poller.snapshot

    @property
    def config(self) -> Config:
        return self.snapshot.config

    async def open(self) -> Poller:
        """Create the one process-wide client session and the poller (not yet polling)."""
        self._session = new_session()
        clocks = self.clocks
        transport = Transport(self._session, self._initial_config.api, monotonic=clocks.monotonic,
                              wall_clock=clocks.wall, sleep=clocks.sleep, random=clocks.random,
                              observer=self.stats.observe)
        self._poller = Poller(transport, self._initial_config, clocks, on_result=self._on_result)
        return self._poller

    async def start(self) -> None:
        poller = await self.open()
        poller.start()
        self._unpolled = set(plan_of(self.config).keys) if self._freeze_gc else None
        self._refresher = asyncio.create_task(self.exposition.run(), name="exposition refresh")
        if self.config.api.version == "v2":
            log.warning("API v2 is deprecated upstream (\"use API v3 with service user authentication\"); "
                        "see the README on moving to a cog_ service user token")
        self._announce(self.config)
        api, shard = self.config.api, self.config.shard
        if shard is not None:
            log.info("sharded: this replica keeps to its share of the key's request rate",
                     extra={"shard": str(shard), "max_requests_per_second": api.max_requests_per_second,
                            "replica_requests_per_second": round(api.requests_per_second, 6)})
        log.info("polling started", extra={"org_sets": len(self.config.org_sets),
                                           "schedules": len(plan_of(self.config).keys),
                                           "api_version": self.config.api.version})

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        if self._poller is not None:
            await self._poller.stop()
        if self._session is not None:
            await self._session.close()

    def ready(self) -> bool:
        """Every org set has had a first poll attempt; once true it stays true, so a reload
        that adds an org set does not pull the pod out of its Service while that set polls."""
        self._was_ready = self._was_ready or plan_of(self.config).ready(self.snapshot)
        return self._was_ready

    def alive(self) -> bool:
        return self._poller is not None and self._poller.alive()

    async def reload(self, load: Callable[[], Config]) -> bool:
        """Apply the config `load` returns; on any error keep the running one and say why.

        `load` (reading and parsing the YAML: ~0.4 s at 1,000 org sets) runs in a worker thread,
        so polls and scrapes go on meanwhile; the result is applied on the event loop.
        """
        async with self._reloading:  # SIGHUP and POST /-/reload: one at a time, each sees the last
            # Loading makes hundreds of thousands of objects, enough to set off a full collection
            # in the worker thread, which holds the GIL and so stops the event loop (~30 ms at
            # 1,000 org sets). With the daemon's frozen heap (see _freeze), collections wait until
            # the new config is applied and frozen: its objects are never scanned at all.
            collecting = self._freeze_gc and gc.isenabled()
            if collecting:
                gc.disable()
            try:
                running = self.config
                loaded = await asyncio.to_thread(_try_load, load, running if self._discovered == () else None)
                if not isinstance(loaded, str):
                    await self._prepare(*loaded)
                return self._apply(loaded)
            finally:
                if collecting:
                    gc.enable()

    async def _prepare(self, config: Config, change: ScheduleChange | None) -> None:
        """Render /metrics for the new config before switching to it (Exposition.prepare), so that
        the scrapes after the switch do not wait for that; for the usual case (discovery off)."""
        poller = self._poller
        if (poller is None or change is None or change.old is not poller.snapshot.config
                or config.discovery.organizations or self._discovered):
            return
        await self.exposition.prepare(poller.snapshot.with_config(config, change.kept))

    def _apply(self, prepared: tuple[Config, ScheduleChange | None] | str) -> bool:
        if isinstance(prepared, str):
            loaded: Config | str = prepared
        else:
            loaded, change = prepared
        if isinstance(loaded, str):
            self.reload_status.successful = False
            self.last_reload_error = loaded
            log.error("%s", loaded)
            return False
        self.last_reload_error = None
        self._base = loaded
        # The organizations last listed keep their sets under the new config (new names, windows,
        # labels or exclusions apply at once); a reload does not wait for the next organizations poll.
        if self._organizations is not None and loaded.discovery.organizations:
            self._discovered = discovered_sets(loaded, self._organizations)
        elif not loaded.discovery.organizations:
            self._discovered = ()
        config = self._running(loaded)
        self._switch(config, change)
        self._freeze("reload")
        if self._unpolled is not None:  # a reload during the first cycle: what the new config has yet to poll
            snap = self.snapshot
            self._unpolled = {k for k in plan_of(config).keys if snap.result(k.org_set, *k.slot).last_attempt is None}
        self.reload_status.successful = True
        self.reload_status.last_success = self._clock()
        self._announce(config)
        log.info("config reloaded", extra={"org_sets": len(config.org_sets),
                                           "schedules": len(plan_of(config).keys)})
        return True

    def _running(self, base: Config) -> Config:
        return base.with_org_sets(self._discovered) if self._discovered else base

    def _switch(self, config: Config, change: ScheduleChange | None = None) -> None:
        if self._poller is not None:
            self._poller.apply_config(config, change)  # (a change made for another config is not used)
        else:  # a SIGHUP during start-up, before the poller exists: start with the new config
            self._initial_config = config
            self._empty = Snapshot.empty(config)
        self._track(config)

    def _track(self, config: Config) -> None:
        counted = plan_of(config).counted
        self.stats.track(counted, counted.__getitem__)

    def _freeze(self, why: str) -> None:
        """gc.freeze(): what is alive now (the config, its plan and schedules, the snapshot's points:
        millions of objects at 1,000 org sets) is left out of every later collection.

        Without it, a full collection scans them all (~0.25 s at 12,000 schedules, the event loop
        stopped), and a reload, which makes many new objects at once, is what sets one off. Only
        the objects made since are scanned then. Frozen objects that become garbage are still freed
        (by reference counting) unless they are in a reference cycle, so this runs on two rare
        occasions only, not periodically. Never a gc.collect() here: that would be the stall itself.
        """
        if self._freeze_gc:
            gc.freeze()
            log.debug("garbage collector: objects frozen", extra={"after": why})  # (counting them takes 40 ms)

    def _announce(self, config: Config) -> None:
        """The lines that say what this config cannot do, once per load."""
        for note in (*config.notes, *plan_of(config).notes):
            log.info("%s", note)

    def _on_result(self, key: ScheduleKey, result: Result) -> None:
        """The one back-edge of the data flow: what the organizations collector lists drives the
        billing cycle other schedules send and, with discovery on, the discovered org sets."""
        unpolled = self._unpolled
        if unpolled is not None:
            unpolled.discard(key)
            if not unpolled:
                self._unpolled = None
                self._freeze("first poll cycle")
        if key.collector != "organizations" or key.org_set != ENTERPRISE or not result.ok:
            return
        points = result.points or ()
        if self._poller is not None:
            self._poller.cycle.learn(points)
        listed = organizations(points)
        self._organizations = listed
        if not self._base.discovery.organizations:
            return
        discovered = discovered_sets(self._base, listed)
        if discovered != self._discovered:
            before = {s.name for s in self._discovered}
            after = {s.name for s in discovered}
            self._discovered = discovered
            self._switch(self._running(self._base))
            changes = {"added": ", ".join(sorted(after - before)), "removed": ", ".join(sorted(before - after))}
            log.info("discovered organizations changed",
                     extra={**{k: v for k, v in changes.items() if v}, "org_sets": len(self.config.org_sets)})


def _try_load(load: Callable[[], Config], running: Config | None = None) -> tuple[Config, ScheduleChange | None] | str:
    """The config `load` returns, with what it changes in the schedules of the `running` config
    (if that is the one it will replace), or the one log line that says why there is none."""
    try:
        config = load()
        prepare(config)  # built here, off the event loop: ~0.2 s at 1,000 org sets
        # And compared with the running config's schedules here, too: ~0.2 s more at 12,000.
        return config, schedule_change(running, config) if running is not None else None
    except ConfigError as exc:
        return f"config reload failed; keeping the running config: {exc}"
    except Exception as exc:
        # A loader bug (e.g. a ValueError or RecursionError that escaped validation) must not
        # escape the SIGHUP callback: it would leave the old config running while
        # devin_exporter_config_last_reload_successful still said 1, with only asyncio's
        # traceback in the log.
        return (f"config reload failed with an internal error; keeping the running config: "
                f"{type(exc).__name__}: {exc}")
