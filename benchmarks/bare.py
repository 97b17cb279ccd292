"""The bare-server baseline: an aiohttp app that reads the body and answers 200 with a small
JSON document, nothing else (``python -m benchmarks.bare PORT``; SIGTERM stops it)."""

from __future__ import annotations

import sys

from aiohttp import web

from bridge.cli.main import event_loop_factory


async def accept(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"status": "accepted"})


def main() -> None:
    app = web.Application()
    app.add_routes([web.post("/update_subscriber_status", accept), web.get("/readyz", accept)])
    # The bridge's own choice of loop (uvloop where installed), as the ingress runs on it.
    factory = event_loop_factory()
    loop = factory() if factory is not None else None
    web.run_app(
        app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None, loop=loop
    )


if __name__ == "__main__":
    main()
