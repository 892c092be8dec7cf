"""The aiohttp app: /metrics, /healthz, /readyz and the landing page, with the poller in its lifecycle."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from exporter.config import Config
from exporter.exposition import metrics_handler
from exporter.landing import render_landing_page
from exporter.plan import plan_of
from exporter.service import Exporter

log = logging.getLogger("exporter")

EXPORTER_KEY = web.AppKey("exporter", Exporter)


def create_app(exporter: Exporter, reload: Callable[[], Config] | None = None) -> web.Application:
    """The app; `reload` loads the config anew for `POST /-/reload` (SPEC §13)."""
    # Basic auth from server.web_config_file guards every route but /healthz. Read once: like
    # the listen address, a changed web config takes effect on restart (a reload validates it).
    web_config = exporter.config.server.web_config
    app = web.Application(middlewares=web_config.middlewares() if web_config is not None else ())
    app[EXPORTER_KEY] = exporter

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await exporter.start()
        yield
        await exporter.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/metrics", metrics_handler(exporter.exposition))
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/", _landing_page(exporter.clocks.wall))
    app.router.add_route("*", "/-/reload", _reload_handler(reload))
    return app


def _reload_handler(reload: Callable[[], Config] | None) -> Callable[[web.Request], Awaitable[web.Response]]:
    """`POST /-/reload`, as Prometheus' `--web.enable-lifecycle`: the same reload as SIGHUP, with its outcome."""
    async def handler(request: web.Request) -> web.Response:
        exporter = request.app[EXPORTER_KEY]
        if not exporter.config.server.enable_lifecycle or reload is None:
            return web.Response(status=403, text="Lifecycle API is not enabled (server.enable_lifecycle).\n")
        if request.method != "POST":
            return web.Response(status=405, headers={"Allow": "POST"}, text="Only POST reloads the config.\n")
        server = exporter.config.server
        if await exporter.reload(reload):
            if exporter.config.server != server:
                log.warning("server settings changed; they take effect after a restart")
            return web.Response(text="config reloaded\n")
        return web.Response(status=500, text=f"{exporter.last_reload_error}\n")
    return handler


async def _healthz(request: web.Request) -> web.Response:
    if request.app[EXPORTER_KEY].alive():
        return web.Response(text="ok\n")
    return web.Response(status=503, text="the poll scheduler is not running\n")


async def _readyz(request: web.Request) -> web.Response:
    exporter = request.app[EXPORTER_KEY]
    if exporter.ready():
        return web.Response(text="ready\n")
    snapshot = exporter.snapshot
    plan = plan_of(snapshot.config)
    waiting = [owner or "(enterprise collectors)" for owner in plan.owners
               if plan.of(owner) and not plan.attempted(snapshot, owner)]
    return web.Response(status=503, text=f"waiting for a first poll of: {', '.join(waiting)}\n")


def _landing_page(clock: Callable[[], float]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=render_landing_page(request.app[EXPORTER_KEY].snapshot, clock()),
                            content_type="text/html")
    return handler
