"""CORS for pages served from other origins (default: same origin only)."""

from __future__ import annotations

from typing import Iterable, Optional
from urllib.parse import urlsplit

from aiohttp import web

from .errors import error_response

# What OpenAI's browser SDKs send besides Content-Type and Authorization.
BASE_ALLOWED_HEADERS = ("Authorization", "Content-Type", "OpenAI-Beta", "OpenAI-Organization",
                        "OpenAI-Project", "OpenAI-Safety-Identifier")


class Cors:
    def __init__(self, origins: Iterable[str]) -> None:
        self.origins = frozenset(o.rstrip("/") for o in origins)

    def allowed(self, request: web.Request, origin: str) -> bool:
        return "*" in self.origins or origin in self.origins or _same_origin(request, origin)

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        origin: Optional[str] = request.headers.get("Origin")
        if origin is None:
            return await handler(request)
        if not self.allowed(request, origin):
            return error_response(403, "origin_not_allowed",
                                  f"Origin {origin} is not allowed; set CORS_ORIGINS on the server.")
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            requested = request.headers.get("Access-Control-Request-Headers", "")
            extra = [h.strip() for h in requested.split(",") if h.strip()]
            response = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = ", ".join(dict.fromkeys([*BASE_ALLOWED_HEADERS, *extra]))
            response.headers["Access-Control-Max-Age"] = "600"
        else:
            response = await handler(request)
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "Location, X-Reconnect-Secret"
        response.headers["Vary"] = "Origin"
        return response


def _same_origin(request: web.Request, origin: str) -> bool:
    # Compare host:port only: behind a TLS-terminating proxy the scheme differs.
    return urlsplit(origin).netloc == request.host
