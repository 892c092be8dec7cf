"""The running exporter: one HTTP client session, the poller and the metrics registry, with reload."""

from __future__ import annotations

import asyncio
import logging
import random as random_module
import time
from collections.abc import Awaitable, Callable

import aiohttp
from prometheus_client import CollectorRegistry

from exporter.transport import UsageClient, new_session
from exporter.clocks import Clocks
from exporter.config import Config, ConfigError
from exporter.exposition import Exposition
from exporter.collector import ApiStats, ExporterCollector, ReloadStatus, build_registry
from exporter.poller import Poller
from exporter.snapshot import Snapshot

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
    ) -> None:
        self._initial_config = config
        self.clocks = Clocks(wall=clock, monotonic=monotonic, sleep=sleep, random=random)
        self._clock = clock
        self.stats = ApiStats()
        self.stats.track(s.name for s in config.org_sets)
        self.reload_status = ReloadStatus(successful=True, last_success=clock())
        self._poller: Poller | None = None
        self._was_ready = False
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
        client = UsageClient(self._session, self._initial_config.api, monotonic=clocks.monotonic,
                             wall_clock=clocks.wall, sleep=clocks.sleep, random=clocks.random,
                             observer=self.stats.observe)
        self._poller = Poller(client, self._initial_config, clocks)
        return self._poller

    async def start(self) -> None:
        poller = await self.open()
        poller.start()
        self._refresher = asyncio.create_task(self.exposition.run(), name="exposition refresh")
        log.info("polling started", extra={"org_sets": len(self.config.org_sets),
                                           "schedules": len(self.snapshot.schedules())})

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
        self._was_ready = self._was_ready or self.snapshot.ready()
        return self._was_ready

    def alive(self) -> bool:
        return self._poller is not None and self._poller.alive()

    async def reload(self, load: Callable[[], Config]) -> bool:
        """Apply the config `load` returns; on any error keep the running one and say why.

        `load` (reading and parsing the YAML: ~0.4 s at 1,000 org sets) runs in a worker thread,
        so polls and scrapes go on meanwhile; the result is applied on the event loop.
        """
        return self._apply(await asyncio.to_thread(_try_load, load))

    def _apply(self, loaded: Config | str) -> bool:
        if isinstance(loaded, str):
            self.reload_status.successful = False
            log.error("%s", loaded)
            return False
        config = loaded
        if self._poller is not None:
            self._poller.apply_config(config)
        else:  # a SIGHUP during start-up, before the poller exists: start with the new config
            self._initial_config = config
            self._empty = Snapshot.empty(config)
        self.stats.track(s.name for s in config.org_sets)
        self.reload_status.successful = True
        self.reload_status.last_success = self._clock()
        log.info("config reloaded", extra={"org_sets": len(config.org_sets),
                                           "schedules": len(self.snapshot.schedules())})
        return True


def _try_load(load: Callable[[], Config]) -> Config | str:
    """The config `load` returns, or the one log line that says why there is none."""
    try:
        return load()
    except ConfigError as exc:
        return f"config reload failed; keeping the running config: {exc}"
    except Exception as exc:
        # A loader bug (e.g. a ValueError or RecursionError that escaped validation) must not
        # escape the SIGHUP callback: it would leave the old config running while
        # devin_exporter_config_last_reload_successful still said 1, with only asyncio's
        # traceback in the log.
        return (f"config reload failed with an internal error; keeping the running config: "
                f"{type(exc).__name__}: {exc}")
