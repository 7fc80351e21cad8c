"""Entry point: `python server.py --help`.

Reads the settings once, builds the signaling app, and, when no upstream is
configured, starts the embedded local Realtime backend beside it so the whole
loop runs offline. Then serves until SIGINT/SIGTERM, draining calls on the way out.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import signal
import ssl
import sys
from typing import Optional

from aiohttp import web

import settings as config
from signaling.app import build_app


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # aiortc and aioice are chatty at INFO about every ICE pair.
    for noisy in ("aioice", "aiortc", "websockets"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


async def serve(settings: config.Settings, ready: Optional[asyncio.Event] = None) -> None:
    runners: list[web.AppRunner] = []
    local_url: Optional[str] = None
    if settings.uses_local_backend:
        from localrt.server import build_local_app  # imported only when used: it loads models

        local_app = build_local_app(settings)
        # The bridge reaches the backend like any upstream: a real WebSocket, on a
        # loopback-only listener (independent of TLS and of the public host).
        local_runner = web.AppRunner(local_app, handle_signals=False)
        await local_runner.setup()
        site = web.TCPSite(local_runner, "127.0.0.1", 0)
        await site.start()
        runners.append(local_runner)
        port = local_runner.addresses[0][1]
        local_url = f"ws://127.0.0.1:{port}/v1/realtime"
        logging.getLogger("server").info("local Realtime backend on %s (responder: %s)", local_url,
                                         settings.local_responder)
    app = build_app(settings, settings.upstream_url(local_url))
    if local_url:
        from localrt.server import STT_POOL, add_local_routes

        add_local_routes(app, settings, local_app[STT_POOL])  # also offered to outside clients at /v1/realtime
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    ssl_context = None
    if settings.tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(settings.tls_cert, settings.tls_key)
    site = web.TCPSite(runner, settings.host, settings.port, ssl_context=ssl_context)
    await site.start()
    runners.insert(0, runner)
    scheme = "https" if ssl_context else "http"
    logging.getLogger("server").info(
        "serving on %s://%s:%d (upstream: %s)", scheme, settings.host, settings.port,
        "embedded local backend" if local_url else _redacted(settings.upstream_url()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready:
        ready.set()
    try:
        await stop.wait()
    finally:
        logging.getLogger("server").info("shutting down")
        # the public app first (drains calls), the local backend it talks to last
        for r in runners:
            await r.cleanup()


def _redacted(url: str) -> str:
    from realtime.upstream import redact

    return redact(url)


def main() -> None:
    settings = config.load_or_exit()
    configure_logging(settings.log_level)
    # `kill -USR1 <pid>` prints every thread's stack to stderr: for a stuck server in production.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        asyncio.run(serve(settings))
    except OSError as exc:
        print(f"error: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except ssl.SSLError as exc:
        print(f"error: TLS certificate/key could not be loaded: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
