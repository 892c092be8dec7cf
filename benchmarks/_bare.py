"""A bare aiohttp server in its own process, serving fixed bodies: what /metrics is compared against.

    python benchmarks/_bare.py DIR

Serves GET /NAME with the bytes of DIR/NAME.body and the headers in DIR/NAME.json (Content-Type,
Content-Encoding), as a handler that does nothing but answer with a ready body would. Prints
`bare listening on URL`, then serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from aiohttp import web

Bodies = dict[str, tuple[bytes, dict[str, str]]]


def load(directory: Path) -> Bodies:
    return {path.stem: (path.read_bytes(), json.loads(path.with_suffix(".json").read_text()))
            for path in directory.glob("*.body")}


async def serve(bodies: Bodies) -> None:
    async def handler(request: web.Request) -> web.Response:
        body, headers = bodies[request.match_info["name"]]
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_get("/{name}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"bare listening on http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(serve(load(Path(sys.argv[1]))))
