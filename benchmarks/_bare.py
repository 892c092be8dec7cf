"""A bare aiohttp server in its own process, serving fixed bodies: what /metrics is compared against.

    python benchmarks/_bare.py DIR

Serves GET /NAME with the bytes of DIR/NAME.body and the headers in DIR/NAME.json (Content-Type,
Content-Encoding), as a handler that does nothing but answer with a ready body would. Prints
`bare listening on URL`, then serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from _serve import serve_until_signalled
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
    await serve_until_signalled(app, "bare")


if __name__ == "__main__":
    asyncio.run(serve(load(Path(sys.argv[1]))))
