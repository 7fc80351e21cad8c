"""Builds the aiohttp application: middlewares, routes, shared state, shutdown."""

from __future__ import annotations

from aiohttp import web

from control import plane as control_plane
from control.routes import add_control_routes
from realtime import redaction
from settings import Settings

from .cors import Cors
from . import metrics, prom
from .errors import error_middleware
from .auth import KeyRing
from .guard import ConnectionGuard, connection_cap, raise_fd_limit
from .admission import NEVER, WINDOW_S, Admission, Thresholds
from .routes import ADMISSION, GUARD, KEYS, REGISTRY, SETTINGS, CallRegistry, Workers, add_routes, recent_lateness_p95


def build_app(settings: Settings, upstream_url: str, workers: Workers = Workers()) -> web.Application:
    redaction.configure(*settings.secrets())
    # Request bodies are never decompressed for us: a body that does not inflate would fail
    # inside aiohttp, after our answer, and reset the connection. Compressed bodies get a 415.
    guard = ConnectionGuard(connection_cap(settings.max_connections, settings.max_calls, raise_fd_limit()))
    app = web.Application(middlewares=[guard.middleware, Cors(settings.cors_origins).middleware, error_middleware],
                          handler_args={"auto_decompress": False})
    app[GUARD] = guard  # attach(runner.server) once the runner is set up
    app[SETTINGS] = settings
    app[REGISTRY] = CallRegistry(settings, upstream_url, workers)
    app[KEYS] = KeyRing(settings.auth_token)
    add_routes(app)
    add_control_routes(app)
    app[REGISTRY].plane = control_plane.install(app, settings)
    metrics.install(app, prom.install(app, app[REGISTRY]))
    app[REGISTRY].plane.metrics = app[prom.PROM]
    registry = app[REGISTRY]
    app[ADMISSION] = Admission(
        lambda: app[metrics.LOOP_LAG].summary(WINDOW_S)["p95"] if metrics.LOOP_LAG in app else 0.0,
        lambda: recent_lateness_p95(registry), Thresholds() if settings.admission else NEVER,
        active_calls=lambda: len(registry.calls))

    if settings.redis_url:
        from cluster.node import ClusterNode
        from .admission import ProcessCpu

        cpu = ProcessCpu()
        registry.cluster = ClusterNode(
            settings.redis_url, settings.node_id or "node", settings.node_url or "", settings.cluster_secret or "",
            settings.max_calls, lambda: {
                "active": len(registry.calls), "cpu": cpu.cores(), "calls": list(registry.calls),
                "lag_p95": app[metrics.LOOP_LAG].summary(WINDOW_S)["p95"] if metrics.LOOP_LAG in app else 0.0,
                "overload": app[ADMISSION].overload()})

        async def cluster_lifecycle(app: web.Application):
            await registry.cluster.start()
            yield
            await registry.cluster.stop()

        app.cleanup_ctx.append(cluster_lifecycle)

    async def drain_calls(app: web.Application) -> None:
        await app[REGISTRY].close_all("server shutting down")

    app.on_shutdown.append(drain_calls)
    return app
