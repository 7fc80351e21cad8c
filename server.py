"""Entry point: `python server.py --help`.

Reads the settings once, builds the signaling app, and, when no upstream is
configured, starts the embedded local Realtime backend beside it so the whole
loop runs offline. Then serves until SIGINT/SIGTERM, draining calls on the way out.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import socket
import ssl
import sys
from dataclasses import dataclass
from typing import Optional

from aiohttp import web

import settings as config
from realtime import redaction
from signaling.app import build_app
from signaling.routes import GUARD, REGISTRY, Workers
from signaling.loglimit import RepeatLimiter
from signaling.slots import CallSlots


#: Seconds an HTTP connection may sit idle (before its first request, or between requests).
IDLE_TIMEOUT_S = 15.0


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RepeatLimiter())  # a flood of one line becomes a count
    # aiortc and aioice are chatty at INFO about every ICE pair.
    for noisy in ("aioice", "aiortc", "websockets"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


@dataclass
class Listeners:
    """Sockets bound by the parent before forking: this worker's share of the public port
    (SO_REUSEPORT) and its loopback-only one (for hangups forwarded by its siblings)."""

    public: socket.socket
    internal: socket.socket
    workers: Workers


async def serve(settings: config.Settings, ready: Optional[asyncio.Event] = None,
                listeners: Optional[Listeners] = None) -> None:
    runners: list[web.AppRunner] = []
    local_url: Optional[str] = None
    workers = listeners.workers if listeners else Workers()
    if settings.uses_local_backend:
        from localrt.server import build_local_app  # imported only when used: it loads models

        local_app = build_local_app(settings, workers=max(1, (os.cpu_count() or 1) // workers.count))
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
    app = build_app(settings, settings.upstream_url(local_url), workers)
    if local_url:
        from control.routes import LOCAL_REALTIME
        from localrt.server import SPEAKER, STT_POOL, add_local_routes, realtime_ws

        # also offered to outside clients at /v1/realtime (with ?call_id=, that path is the sideband)
        add_local_routes(app, settings, local_app[STT_POOL], local_app[SPEAKER], route=False)
        app[LOCAL_REALTIME] = realtime_ws
    # A connection that sends nothing is closed after IDLE_TIMEOUT_S (aiohttp's default is an hour:
    # 20,000 silent connections once ran the process out of file descriptors).
    runner = web.AppRunner(app, handle_signals=False, access_log=None, keepalive_timeout=IDLE_TIMEOUT_S)
    await runner.setup()
    app[GUARD].attach(runner.server)  # the connection cap (signaling/guard.py)
    ssl_context = None
    if settings.tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if listeners:
        await web.SockSite(runner, listeners.public, ssl_context=ssl_context).start()
        await web.SockSite(runner, listeners.internal).start()
    else:
        await web.TCPSite(runner, settings.host, settings.port, ssl_context=ssl_context).start()
    runners.insert(0, runner)
    scheme = "https" if ssl_context else "http"
    logging.getLogger("server").info(
        "%sserving on %s://%s:%d (upstream: %s)",
        f"worker {workers.index + 1}/{workers.count} " if workers.count > 1 else "", scheme, settings.host, settings.port,
        "embedded local backend" if local_url else _redacted(settings.upstream_url()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready:
        ready.set()
    try:
        await stop.wait()
        stop.clear()
        # drain: no new calls (a cluster sends them to other nodes), live ones go on up to
        # DRAIN_SECONDS; a second signal cuts it short
        drain = asyncio.ensure_future(app[REGISTRY].drain(settings.drain_seconds))
        cut = asyncio.ensure_future(stop.wait())
        await asyncio.wait([drain, cut], return_when=asyncio.FIRST_COMPLETED)
        for task in (drain, cut):
            task.cancel()
    finally:
        app[REGISTRY].draining = True  # offers still being answered get 503, not a call that is torn down
        logging.getLogger("server").info("shutting down")
        # the public app first (drains calls), the local backend it talks to last
        for r in runners:
            await r.cleanup()


def _redacted(url: str) -> str:
    from realtime.upstream import redact

    return redact(url)


def run_workers(settings: config.Settings) -> int:
    """One process per worker, forked before any event loop exists. The parent binds the
    sockets, forwards SIGINT/SIGTERM, and waits; each worker is a whole server (its own calls,
    its own local backend) accepting on the shared port."""
    # One SO_REUSEPORT socket per worker on the same port: the kernel spreads new
    # connections over them (a single shared socket wakes whichever process it likes).
    public = [socket.create_server((settings.host, settings.port), backlog=512, reuse_port=True)
              for _ in range(settings.workers)]
    internal = [socket.create_server(("127.0.0.1", 0)) for _ in range(settings.workers)]
    ports = tuple(s.getsockname()[1] for s in internal)
    slots = CallSlots(settings.max_calls)  # shared memory, inherited by every worker
    pids = []
    for index in range(settings.workers):
        pid = os.fork()
        if pid == 0:
            for j in range(settings.workers):
                if j != index:
                    public[j].close()
                    internal[j].close()
            listeners = Listeners(public[index], internal[index], Workers(index, settings.workers, ports, slots))
            code = 0
            try:
                asyncio.run(serve(settings, listeners=listeners))
            except BaseException:
                logging.getLogger("server").exception("worker %d failed", index)
                code = 1
            os._exit(code)
        pids.append(pid)
    for sock in (*public, *internal):
        sock.close()

    def forward(signum, _frame) -> None:
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    worst = 0
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        worst = max(worst, os.waitstatus_to_exitcode(status))
    return worst


def main() -> None:
    settings = config.load_or_exit()
    redaction.configure(*settings.secrets())  # before the first log line
    configure_logging(settings.log_level)
    # `kill -USR1 <pid>` prints every thread's stack to stderr: for a stuck server in production.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        if settings.workers > 1:
            raise SystemExit(run_workers(settings))
        asyncio.run(serve(settings))
    except OSError as exc:
        print(f"error: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except ssl.SSLError as exc:
        print(f"error: TLS certificate/key could not be loaded: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
