"""The operator's routes (credential: BRIDGE_AUTH_TOKEN; see `operator_refusal`).

GET /v1/realtime?call_id={id}        the sideband WebSocket (control/sideband.py)
GET /v1/realtime/calls/{id}          a call's record: live, or from the record store
GET /v1/realtime/calls?since=&limit= records created since a time (Unix seconds or ISO 8601), oldest first

With several workers, a live call's record and its sideband are served by the
worker that holds the call (forwarded over loopback); ended records come from
the shared store, by whichever worker is asked.
"""

from __future__ import annotations

import asyncio
import ipaddress
from datetime import datetime, timezone
import logging
from typing import Any, Awaitable, Callable, Optional
from urllib.parse import urlencode

import websockets
from aiohttp import WSMsgType, web
from redis.exceptions import RedisError

from signaling.auth import bearer
from signaling.errors import error_response
from signaling.routes import (CALL_ID, KEYS, REGISTRY, SETTINGS, ClusterUnavailable, _cluster_unavailable, _forward,
                             elsewhere, find_call, gather_reports, internal_headers)

from .plane import PLANE
from .sideband import Sideband

logger = logging.getLogger(__name__)

#: The embedded local backend's own WebSocket handler, served at /v1/realtime without call_id.
LOCAL_REALTIME = web.AppKey("local_realtime", Callable[[web.Request], Awaitable[web.StreamResponse]])
MAX_LIST = 100


def operator_refusal(request: web.Request) -> Optional[web.Response]:
    """None if the request carries the operator's credential; else the 401/403 to answer."""
    keys = request.app[KEYS]
    if keys.required:
        if keys.is_token(bearer(request)):
            return None
        return error_response(401, "invalid_api_key", "This route needs 'Authorization: Bearer <BRIDGE_AUTH_TOKEN>' "
                              "(ephemeral keys are for pages, not for the operator).",
                              headers={"WWW-Authenticate": "Bearer"})
    if request.app[SETTINGS].operator_on_loopback and _loopback(request.remote):
        return None
    return error_response(403, "operator_routes_disabled",
                          "Operator routes need BRIDGE_AUTH_TOKEN to be set on the server (or OPERATOR_ON_LOOPBACK=true "
                          "for clients on this machine).")


def _loopback(address: Optional[str]) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


async def realtime_socket(request: web.Request) -> web.StreamResponse:
    """`/v1/realtime`: with `call_id`, the operator's sideband; without, the local backend
    (when it is embedded)."""
    call_id = request.query.get("call_id")
    if call_id is None:
        if LOCAL_REALTIME in request.app:
            return await request.app[LOCAL_REALTIME](request)
        return error_response(400, "missing_required_parameter",
                              "Give ?call_id=<id of a live call> to attach to it (this bridge's upstream is elsewhere).",
                              param="call_id")
    refusal = operator_refusal(request)
    if refusal is not None:
        return refusal
    call = await find_call(request.app[REGISTRY], call_id)
    if isinstance(call, str):
        return await _relay_socket(request, call)
    if isinstance(call, web.Response):
        return call
    if call.reason is not None:
        return error_response(404, "call_not_found", f"No active call with id '{call_id}'.", param="call_id")
    ws = web.WebSocketResponse(max_msg_size=256 * 1024, heartbeat=30.0)
    await ws.prepare(request)
    plane = request.app[PLANE]
    sideband = Sideband(ws, call, plane.sideband_policy,
                        include_audio=request.query.get("include_audio", "").lower() in ("1", "true", "yes"))
    logger.info("call %s: sideband attached (%d watching)", call.id, len(call.sidebands) + 1)
    await sideband.run(call.session)
    logger.info("call %s: sideband detached (sent %d, received %d)", call.id, sideband.sent, sideband.received)
    return ws


async def _relay_socket(request: web.Request, base: str) -> web.StreamResponse:
    """The call is in a sibling worker or another node: carry the socket over to it, both
    ways, close codes included (its inner leg speaks `websockets`, which reports the close
    it was sent)."""
    headers = {k: v for k, v in internal_headers(request).items() if k.lower() != "content-type"}
    ws_base = "ws" + base[4:] if base.startswith("http") else base
    try:
        inner = await websockets.connect(f"{ws_base}/v1/realtime?{urlencode(list(request.query.items()))}",
                                         additional_headers=headers, max_size=None, open_timeout=5)
    except websockets.InvalidStatus as exc:
        status = exc.response.status_code
        return error_response(status if status >= 400 else 502, "call_not_found" if status == 404 else "worker_refused",
                              "The worker holding this call refused the sideband.")
    except (OSError, TimeoutError, websockets.WebSocketException):
        return error_response(503, "worker_unavailable", "The worker holding this call did not answer.")
    outer = web.WebSocketResponse(max_msg_size=256 * 1024, heartbeat=30.0)
    await outer.prepare(request)

    async def up() -> None:  # the operator → the call's worker
        try:
            async for msg in outer:
                if msg.type == WSMsgType.TEXT:
                    await inner.send(msg.data)
        finally:
            await inner.close()

    async def down() -> None:  # the call's worker → the operator
        try:
            async for message in inner:
                await outer.send_str(message if isinstance(message, str) else message.decode("utf-8", "replace"))
        except websockets.ConnectionClosed:
            pass
        finally:
            code = inner.close_code if inner.close_code in (1000, 1008) else 1011
            await outer.close(code=code, message=(inner.close_reason or "").encode()[:120])

    await asyncio.gather(up(), down(), return_exceptions=True)
    return outer


async def call_record(request: web.Request) -> web.Response:
    refusal = operator_refusal(request)
    if refusal is not None:
        return refusal
    call_id = request.match_info["call_id"]
    registry = request.app[REGISTRY]
    call = registry.calls.get(call_id)
    if call is not None:
        return web.json_response(call.record.data)
    if "local" not in request.query:
        try:  # live on another worker or node; or ended on another node (whose store has it)
            base = await elsewhere(registry, call_id) or await elsewhere(registry, call_id, ended=True)
        except ClusterUnavailable:
            return _cluster_unavailable()
        if base is not None:
            forwarded = await _forward(base, request, "", query="local=1")
            if forwarded.status != 404:
                return forwarded
    plane = request.app[PLANE]
    record = await plane.store.get(call_id) if plane.store is not None and CALL_ID.fullmatch(call_id) else None
    if record is None:
        why = "" if plane.store is not None else " (this server keeps no records: RECORDS_DB=none)"
        return error_response(404, "call_not_found", f"No call with id '{call_id}'{why}.", param="call_id")
    if plane.deliverer is not None:
        record["webhooks"] = await plane.store.webhook_status(call_id)
    return web.json_response(record)


async def list_calls(request: web.Request) -> web.Response:
    refusal = operator_refusal(request)
    if refusal is not None:
        return refusal
    plane = request.app[PLANE]
    if plane.store is None:
        return error_response(404, "records_disabled", "This server keeps no call records (RECORDS_DB=none).")
    try:
        since = _instant(request.query.get("since", "0"))
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        return error_response(400, "invalid_value", "'since' is a Unix time in seconds or an ISO 8601 time "
                              "(2026-12-01T10:00:00Z), and 'limit' an integer.")
    if not 1 <= limit <= MAX_LIST:
        return error_response(400, "invalid_value", f"'limit' must be from 1 to {MAX_LIST}.", param="limit")
    records, more = await plane.store.list(since, limit)
    cluster = request.app[REGISTRY].cluster
    if cluster is not None and "local" not in request.query:
        # each node keeps its own calls' records: ask the others too, and merge
        for reply in await _from_other_nodes(request, cluster, f"/v1/realtime/calls?since={since!r}&limit={limit}&local=1"):
            records += reply.get("data") or []
            more = more or bool(reply.get("has_more"))
        records.sort(key=lambda r: (r.get("created_at") or 0, r.get("id") or ""))
        more = more or len(records) > limit
        records = records[:limit]
    body: dict[str, Any] = {"object": "list", "data": records, "has_more": more}
    if more and records:
        body["next_since"] = records[-1]["created_at"]
    return web.json_response(body)


def _instant(text: str) -> float:
    """Unix seconds from `1764583200.5` or `2026-12-01T10:00:00Z` (no zone: UTC)."""
    try:
        return float(text)
    except ValueError:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "+"))  # '+' arrives as a space
        return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


async def _from_other_nodes(request: web.Request, cluster, path: str) -> list[dict]:
    try:
        nodes = [n for n in await cluster.nodes() if n.id != cluster.id]
    except (RedisError, OSError):
        return []
    headers = {k: v for k, v in internal_headers(request).items() if k.lower() != "content-type"}
    return await gather_reports([n.url + path for n in nodes], headers=headers)


def add_control_routes(app: web.Application) -> None:
    app.router.add_get("/v1/realtime", realtime_socket)
    app.router.add_get("/v1/realtime/calls", list_calls)
    app.router.add_get("/v1/realtime/calls/{call_id}", call_record)

