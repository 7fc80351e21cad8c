"""OpenAI's error shape for HTTP: {"error": {"type", "code", "message", "param"}}."""

from __future__ import annotations

import logging
from typing import Optional

from aiohttp import web

from realtime.redaction import redact

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 502: "server_error", 503: "server_error"}


def error_response(status: int, code: str, message: str, *, param: Optional[str] = None,
                   headers: Optional[dict[str, str]] = None) -> web.Response:
    """An error reply in OpenAI's shape, with the type that goes with `status`."""
    body = {"error": {"type": _TYPES.get(status, "server_error"), "code": code, "message": redact(message),
                      "param": param}}
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Every error, including aiohttp's own 404/405, leaves in the same JSON shape."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        return error_response(415, "unsupported_content_encoding",
                              f"Content-Encoding '{encoding[:40]}' is not supported; send the body uncompressed.")
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status, "http_error")
        return error_response(exc.status, code, exc.reason or "error", headers={
            k: v for k, v in exc.headers.items() if k.lower() == "allow"})
    except Exception:
        logger.exception("unhandled error on %s %s", request.method, request.path[:200])
        return error_response(500, "internal_error", "Internal server error.")
