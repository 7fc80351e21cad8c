"""Builds the aiohttp application: middlewares, routes, shared state, shutdown."""

from __future__ import annotations

from aiohttp import web

from realtime import redaction
from settings import Settings

from .cors import Cors
from . import metrics
from .errors import error_middleware
from .auth import KeyRing
from .routes import KEYS, REGISTRY, SETTINGS, CallRegistry, Workers, add_routes


def build_app(settings: Settings, upstream_url: str, workers: Workers = Workers()) -> web.Application:
    redaction.configure(settings.api_key, settings.auth_token)
    app = web.Application(middlewares=[Cors(settings.cors_origins).middleware, error_middleware])
    app[SETTINGS] = settings
    app[REGISTRY] = CallRegistry(settings, upstream_url, workers)
    app[KEYS] = KeyRing(settings.auth_token)
    add_routes(app)
    metrics.install(app)

    async def drain_calls(app: web.Application) -> None:
        await app[REGISTRY].close_all("server shutting down")

    app.on_shutdown.append(drain_calls)
    return app
