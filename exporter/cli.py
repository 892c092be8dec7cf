"""Command line: flags, logging, signals, and the wiring of config, exporter and server."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence

from aiohttp import web
from prometheus_client import generate_latest

from exporter import __version__
from exporter.config import ApiVersion, Config, ConfigError, load_config, parse_listen
from exporter.logs import LOG_LEVELS, setup_logging
from exporter.plan import plan_of
from exporter.server import create_app
from exporter.service import Exporter
from exporter.shard import Shard, parse_shard

log = logging.getLogger("exporter")

SHUTDOWN_TIMEOUT = 2.0  # seconds for open scrapes to finish; SIGTERM must exit within 5 s


def _listen(text: str) -> tuple[str, int]:
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _shard(text: str) -> Shard:
    try:
        return parse_shard(text, os.environ)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devin-usage-exporter",
        description="Prometheus exporter for Devin enterprise usage metrics. "
        "`devin-usage-exporter backfill --help` writes past history for Prometheus; "
        "`devin-usage-exporter simulate --help` runs the API simulator alone.",
    )
    parser.add_argument("--config", metavar="FILE",
                        default=os.environ.get("DEVIN_EXPORTER_CONFIG", "config.yaml"),
                        help="YAML config (default: $DEVIN_EXPORTER_CONFIG, else config.yaml)")
    parser.add_argument("--listen", metavar="HOST:PORT", type=_listen,
                        help="address to serve /metrics on (overrides server.listen)")
    parser.add_argument("--shard", metavar="INDEX/COUNT", type=_shard,
                        help="poll only this replica's share of the org sets, split among COUNT replicas by "
                        "a hash of their names (overrides `shard` in the config); auto/COUNT takes INDEX "
                        "from the trailing -N of $HOSTNAME, as in a StatefulSet pod name")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    parser.add_argument("--log-format", choices=("logfmt", "json"), default="logfmt")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check-config", action="store_true",
                      help="validate the config and that the API key resolves, then exit")
    mode.add_argument("--once", action="store_true",
                      help="poll every org set and window once, print the metrics, exit 0 if all succeeded")
    mode.add_argument("--demo", action="store_true",
                      help="run against the embedded API simulator with a built-in config")
    mode.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--api-version", choices=("v3", "v2"), default="v3",
                        help="with --demo: the API version the demo speaks (default v3; v2 is the legacy path)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["simulate"]:
        from exporter.simulator import main as simulate  # the simulator is a dev tool; load on demand

        return simulate(args_list[1:])
    if args_list[:1] == ["backfill"]:
        from exporter.backfill import main as backfill  # its progress bar library loads only here

        return backfill(args_list[1:])
    args = build_parser().parse_args(args_list)  # bad flags: argparse prints usage, exits 2
    if args.version:
        print(f"devin-usage-exporter {__version__}")
        return 0
    setup_logging(args.log_level, args.log_format)
    if args.demo:
        return _run(_demo(args.listen, args.api_version))
    if "--api-version" in args_list or any(a.startswith("--api-version=") for a in args_list):
        print("devin-usage-exporter: --api-version is for --demo; set api.version in the config",
              file=sys.stderr)
        return 2

    def load() -> Config:
        config = load_config(args.config)
        if args.listen:
            config = dataclasses.replace(
                config, server=dataclasses.replace(config.server, host=args.listen[0], port=args.listen[1]))
        if args.shard is not None:
            config = config.with_shard(args.shard)
        if config.shard is not None and not config.org_sets:
            # Not an error: replicas outnumbering org sets is a valid (if wasteful) deployment.
            log.warning("this shard owns none of the org sets; serving health metrics only",
                        extra={"shard": str(config.shard), "org_sets": len(config.all_org_sets)})
        return config

    try:
        config = load()
    except ConfigError as exc:
        print(f"devin-usage-exporter: config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"devin-usage-exporter: config error: {args.config}: cannot load: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 2
    if args.check_config:
        print(config.summary())
        # What this config cannot publish, and why (never a number under a label meaning something else).
        for note in plan_of(config).notes:
            print(f"note: {note}")
        return 0
    if args.once:
        return _run(_once(config))
    return _run(serve(Exporter(config, freeze_gc=True), load))


def _run(coro: Coroutine[object, object, int]) -> int:
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
        return 0


async def _once(config: Config) -> int:
    exporter = Exporter(config)
    poller = await exporter.open()
    try:
        ok = await poller.poll_all_once()
    finally:
        await exporter.close()
    sys.stdout.write(generate_latest(exporter.registry).decode())
    sys.stdout.flush()
    return 0 if ok else 1


async def serve(exporter: Exporter, reload: Callable[[], Config], *, announce: str | None = None) -> int:
    """Serve until SIGTERM/SIGINT; SIGHUP reloads the config through `reload`."""
    server = exporter.config.server
    tls = server.web_config.tls if server.web_config is not None else None
    try:
        ssl_context = tls.ssl_context() if tls is not None else None
    except ConfigError as exc:  # a certificate removed or replaced since the config was checked
        log.error("config error: %s", exc)
        return 2
    # Handlers first, so a SIGTERM during start-up is still a clean stop.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reloader(exporter, reload))
    runner = web.AppRunner(create_app(exporter, reload), access_log=None, handle_signals=False,
                           shutdown_timeout=SHUTDOWN_TIMEOUT)
    try:
        await runner.setup()  # starts polling through the app's cleanup_ctx
        await web.TCPSite(runner, server.host, server.port, ssl_context=ssl_context).start()
    except OSError as exc:
        log.error("cannot listen on %s: %s", server.listen, exc.strerror or exc)
        await runner.cleanup()
        return 1
    host, port = runner.addresses[0][:2]
    scheme = "https" if ssl_context is not None else "http"
    url = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}/"
    log.info("listening", extra={"url": url, "version": __version__})
    if announce:
        print(announce.format(url=url), flush=True)
    await stop.wait()
    log.info("shutting down")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
    await runner.cleanup()
    return 0


def _reloader(exporter: Exporter, reload: Callable[[], Config]) -> Callable[[], None]:
    """The SIGHUP handler: reload in the background, one reload at a time; a SIGHUP during one
    runs one more after it (the file may have changed again since it was read)."""
    running: asyncio.Task[None] | None = None
    again = False

    async def reload_until_settled() -> None:
        nonlocal again
        while True:
            server = exporter.config.server
            if await exporter.reload(reload) and exporter.config.server != server:
                log.warning("server settings changed; they take effect after a restart")
            if not again:
                return
            again = False

    def on_sighup() -> None:
        nonlocal running, again
        log.info("SIGHUP received, reloading the config")
        if running is not None and not running.done():
            again = True
            return
        again = False
        running = asyncio.create_task(reload_until_settled(), name="config reload")
    return on_sighup


async def _demo(listen: tuple[str, int] | None, version: ApiVersion) -> int:
    from exporter.demo import DEMO_LISTEN, demo_config
    from exporter.simulator import DEFAULT_DEMO_KEY, DEFAULT_V3_TOKEN, start_simulator

    runner, base_url = await start_simulator()
    try:
        address = f"{listen[0]}:{listen[1]}" if listen else DEMO_LISTEN
        key = DEFAULT_V3_TOKEN if version == "v3" else DEFAULT_DEMO_KEY
        config = demo_config(base_url, key, address, version)
        log.info("demo: simulated Devin API", extra={"url": base_url})
        return await serve(Exporter(config), lambda: config,
                           announce="Demo running: open {url} (metrics at {url}metrics). Ctrl-C stops it.")
    finally:
        await runner.cleanup()
