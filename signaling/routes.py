"""HTTP routes: OpenAI's WebRTC call interface, plus health and the page.

POST /v1/realtime/calls                 SDP offer in, 201 + SDP answer + Location out
                                        (application/sdp, application/json, or multipart sdp+session)
POST /v1/realtime/calls/{id}/hangup     end a call
GET  /healthz                           readiness and active calls
GET  /config.json                       what the page needs (ICE servers)
GET  /                                  the page
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from cluster.node import CLUSTER_HEADER, NODE_HEADER, ClusterNode
from media.ice import PortsExhausted
from redis.exceptions import RedisError
from realtime import events
from realtime.call import Call, CallEnded
from realtime.policy import MAX_DEPTH, ClientEventPolicy, nesting_depth
from realtime.upstream import UpstreamBusy, UpstreamError, UpstreamSession
from settings import Settings

from .auth import DEFAULT_TTL_S, MAX_TTL_S, MIN_TTL_S, KeyRing, KeyTooLarge, bearer
from .errors import error_response
from .metrics import percentiles
from .sdp import OfferError, validate_offer
from .admission import WINDOW_S, Admission
from .guard import BODY_TIMEOUT_S, ConnectionGuard
from .ratelimit import OfferLimits
from .slots import CallSlots

logger = logging.getLogger(__name__)

MAX_OFFER_BYTES = 64 * 1024
#: What a call id looks like (`events.new_id("rtc")`, plus `w<worker>` with several workers).
CALL_ID = re.compile(r"rtc_[0-9a-f]{22}(?:w[0-9]{1,3})?")
CLIENT_DIR = Path(__file__).resolve().parent.parent / "client"


@dataclass(frozen=True)
class Workers:
    """Where this process stands among the server's worker processes."""

    index: int = 0
    count: int = 1
    internal_ports: tuple[int, ...] = ()  # each worker's loopback-only port, for forwarded hangups
    slots: Optional[CallSlots] = None  # the server-wide call count, shared by the workers

    def owner(self, call_id: str) -> Optional[int]:
        """The worker a call id belongs to (ids end in `w<index>` when there are several).
        Only well-formed ids are ever forwarded: the id goes into a URL path."""
        if not CALL_ID.fullmatch(call_id):
            return None
        head, sep, tail = call_id.rpartition("w")
        return int(tail) if sep and tail.isdigit() and int(tail) < self.count else None


class CallRegistry:
    """The live calls of this process. A call removes itself when it has closed."""

    def __init__(self, settings: Settings, upstream_url: str, workers: Workers = Workers()) -> None:
        self.settings = settings
        self.upstream_url = upstream_url
        self.workers = workers
        self.calls: dict[str, Call] = {}
        self.policy = ClientEventPolicy(settings.client_events, settings.session_fields)
        self.total = 0
        # the operator's limit is for the whole server, counted across its workers
        self.slots = workers.slots or CallSlots(settings.max_calls)
        self.max_calls = settings.max_calls
        self.limits = OfferLimits(settings.offers_per_minute, settings.pending_offers_per_address)
        self._pending: dict[str, str] = {}  # call id → address, until the call connects or ends
        self.draining = False  # SIGTERM: no new calls, offers in flight refused
        self.plane = None  # control.plane.ControlPlane: records, tools, recording
        self.cluster: Optional[ClusterNode] = None  # with REDIS_URL
        self._cluster_tasks: set[asyncio.Task] = set()
        self.metrics = None  # signaling.prom.BridgeMetrics
        self.refused_full = 0
        self.refused_overloaded = 0

    @property
    def full(self) -> bool:
        return self.slots.full

    def create(self, address: Optional[str] = None, *, slot_taken: bool = False) -> Optional[Call]:
        """A new call, or None if the server is at MAX_CALLS. `address`: the client's, counted
        against its pending-offer limit until the call connects or ends (None: exempt).
        `slot_taken`: the cluster gave it a slot already."""
        if not slot_taken and not self.slots.take():
            return None
        call_id = events.new_id("rtc")
        if self.workers.count > 1:
            call_id += f"w{self.workers.index}"
        upstream = UpstreamSession(self.upstream_url, self.settings.upstream_headers())
        call = Call(call_id, self.settings, upstream, self.policy, on_closed=self._closed)
        if self.cluster is not None:
            call.node_id = call.record.data["node"] = self.cluster.id
        if address is not None:
            self._pending[call_id] = address
            self.limits.started(address)
            call.on_connected = self._settle
        self.calls[call_id] = call
        self.total += 1
        if self.plane is not None:
            self.plane.call_created(call)
        if self.metrics is not None:
            call.observe = self.metrics.observe
        return call

    def refusals(self) -> dict[str, int]:
        """Offers refused before a call was made, by why."""
        return {"rate_limited": self.limits.refused_rate, "pending_limit": self.limits.refused_pending,
                "too_many_calls": self.refused_full, "overloaded": self.refused_overloaded}

    def _settle(self, call: Call) -> None:
        address = self._pending.pop(call.id, None)
        if address is not None:
            self.limits.settled(address)

    def _closed(self, call: Call) -> None:
        self._settle(call)
        if self.plane is not None:
            self.plane.call_closed(call)
        if self.metrics is not None:
            self.metrics.call_ended(call)
        if self.calls.pop(call.id, None) is not None:
            if self.cluster is not None:
                task = asyncio.get_running_loop().create_task(self._cluster_closed(call.id))
                self._cluster_tasks.add(task)
                task.add_done_callback(self._cluster_tasks.discard)
            else:
                self.slots.give()

    async def _cluster_closed(self, call_id: str) -> None:
        assert self.cluster is not None
        try:
            await self.cluster.give_slot()
            await self.cluster.call_ended(call_id)
        except (RedisError, OSError) as exc:
            logger.warning("cluster: releasing call %s failed: %s", call_id, exc)

    async def close_all(self, reason: str) -> None:
        self.draining = True
        calls = list(self.calls.values())
        for call in calls:
            call.end(reason)
        await asyncio.gather(*(c.wait_closed() for c in calls), return_exceptions=True)
        if self._cluster_tasks:
            await asyncio.gather(*self._cluster_tasks, return_exceptions=True)

    async def drain(self, deadline_s: float) -> None:
        """SIGTERM: take no new calls (a cluster places them elsewhere) and let the live ones
        finish, for up to `deadline_s`; `close_all` ends what is left."""
        self.draining = True
        if self.cluster is not None:
            self.cluster.draining = True
            await self.cluster.beat_now()
        if self.calls and deadline_s > 0:
            logger.info("draining: %d calls may go on for up to %g s", len(self.calls), deadline_s)
            end = time.monotonic() + deadline_s
            while self.calls and time.monotonic() < end:
                await asyncio.sleep(0.2)


REGISTRY = web.AppKey("registry", CallRegistry)
ADMISSION = web.AppKey("admission", Admission)
SETTINGS = web.AppKey("settings", Settings)
KEYS = web.AppKey("keys", KeyRing)
GUARD = web.AppKey("guard", ConnectionGuard)


async def read_body(request: web.Request) -> bytes:
    """The whole body, at most MAX_OFFER_BYTES (callers bound the time with `_deadline`)."""
    if request.content_length is not None and request.content_length > MAX_OFFER_BYTES:
        raise _TooLarge
    try:
        body = bytearray()
        while len(body) <= MAX_OFFER_BYTES:  # read() with a size returns what has come so far
            chunk = await request.content.read(MAX_OFFER_BYTES + 1 - len(body))
            if not chunk:
                break
            body += chunk
    except (aiohttp.ClientPayloadError, RequestPayloadError) as exc:  # does not decode (bad gzip, cut chunks)
        raise _BadRequest("invalid_body", f"The request body could not be read: {exc}") from None
    if len(body) > MAX_OFFER_BYTES:
        raise _TooLarge
    return bytes(body)


async def _raw_body(request: web.Request) -> "bytes | web.Response":
    """The body as it came (to pass on to another worker or node), or the error reply."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            return await read_body(request)
    except TimeoutError:
        return _body_timeout()
    except _TooLarge:
        return error_response(413, "body_too_large", f"Request body exceeds {MAX_OFFER_BYTES} bytes.")
    except _BadRequest as exc:
        return error_response(400, exc.code, str(exc), param=exc.param)


def _body_timeout() -> web.Response:
    return error_response(408, "request_timeout", f"The request body did not arrive within {BODY_TIMEOUT_S:g} s.",
                          headers={"Connection": "close"})


def parse_json(data: bytes) -> Any:
    """JSON with a nesting limit checked before parsing (deep documents exhaust the parser)."""
    if nesting_depth(data) > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None


class _TooLarge(Exception):
    pass


class _BadRequest(Exception):
    def __init__(self, code: str, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.code, self.param = code, param


async def _parse_offer(request: web.Request) -> tuple[str, Optional[dict[str, Any]], bool]:
    """(sdp, page session or None, reply as JSON?) from any of the accepted body shapes."""
    ctype = request.content_type
    if ctype == "application/sdp":
        return (await read_body(request)).decode("utf-8", "replace"), None, False
    if ctype == "application/json":
        try:
            body = parse_json(await read_body(request))
        except ValueError as exc:
            raise _BadRequest("invalid_json", f"Request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict) or not isinstance(body.get("sdp"), str):
            raise _BadRequest("missing_required_parameter", "JSON body needs a string 'sdp'.", "sdp")
        if body.get("type", "offer") != "offer":
            raise _BadRequest("invalid_value", "'type' must be 'offer'.", "type")
        session = body.get("session")
        return body["sdp"], session if isinstance(session, dict) else None, True
    if ctype == "multipart/form-data":
        if request.content_length is not None and request.content_length > MAX_OFFER_BYTES:
            raise _TooLarge
        parts: dict[str, str] = {}
        total = 0
        try:
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, aiohttp.BodyPartReader):
                    raise ValueError("nested multipart bodies are not accepted")
                data = await part.read(decode=True)
                total += len(data)
                if total > MAX_OFFER_BYTES:
                    raise _TooLarge
                if part.name:
                    parts[part.name] = data.decode("utf-8", "replace")
        except (ValueError, AssertionError, aiohttp.ClientPayloadError, RequestPayloadError, RuntimeError,
                HttpProcessingError) as exc:
            raise _BadRequest("invalid_multipart", f"The multipart body could not be parsed: {exc}") from None
        if "sdp" not in parts:
            raise _BadRequest("missing_required_parameter", "multipart body needs an 'sdp' part.", "sdp")
        session = None
        if parts.get("session"):
            try:
                session = parse_json(parts["session"].encode())
            except ValueError:
                raise _BadRequest("invalid_json", "The 'session' part is not valid JSON.", "session") from None
        return parts["sdp"], session if isinstance(session, dict) else None, False
    raise _UnsupportedType(ctype)


class _UnsupportedType(Exception):
    pass


async def _read_offer(request: web.Request) -> "tuple[str, Optional[dict[str, Any]], bool] | web.Response":
    """The offer of a request (sdp, page session, reply as JSON?), checked; or the error reply."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            sdp, session, as_json = await _parse_offer(request)
    except TimeoutError:
        return _body_timeout()
    except _TooLarge:
        return error_response(413, "body_too_large", f"Request body exceeds {MAX_OFFER_BYTES} bytes.")
    except _UnsupportedType as exc:
        return error_response(415, "unsupported_media_type",
                              f"Content-Type '{exc}' is not supported; send application/sdp, "
                              "application/json or multipart/form-data.")
    except _BadRequest as exc:
        return error_response(400, exc.code, str(exc), param=exc.param)
    try:
        validate_offer(sdp)
    except OfferError as exc:
        return error_response(400, "invalid_offer", str(exc), param="sdp")
    return sdp, session, as_json


def _unauthorized(message: str) -> web.Response:
    return error_response(401, "invalid_api_key", message, headers={"WWW-Authenticate": "Bearer"})


def _shutting_down() -> web.Response:
    return error_response(503, "server_shutting_down", "The server is shutting down; try again shortly.",
                          headers={"Retry-After": "5"})


async def create_call(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    cluster = registry.cluster
    # an offer another node placed here (it did the per-address limits), or a client's
    from_node = cluster is not None and cluster.trusted(request.headers.get(CLUSTER_HEADER))
    if registry.draining and (cluster is None or from_node):
        return _shutting_down()
    keys = request.app[KEYS]
    key_session = None
    operator = False  # the operator's own token: exempt from the per-address limits
    if keys.required:
        presented = bearer(request)
        ephemeral = keys.ephemeral(presented)
        operator = ephemeral is None and keys.is_token(presented)
        if ephemeral is None and not operator:
            return _unauthorized("This server needs 'Authorization: Bearer <key>' with a valid, unexpired key "
                                 "(mint one with POST /v1/realtime/client_secrets).")
        key_session = ephemeral.session if ephemeral else None
    address = None if operator or from_node else (request.remote or "unknown")
    if address is not None:
        limited = registry.limits.check(address)
        if limited is not None:
            reason, retry = limited
            return error_response(429, "rate_limited", f"Too many offers: {reason}; try again in {retry} s.",
                                  headers={"Retry-After": str(retry)})
    if cluster is not None and not from_node:
        placed = await _place(request, registry, cluster)
        if placed is not None:
            return placed  # answered by the node it was placed on (or refused for the cluster)
    offer = await _read_offer(request)
    if isinstance(offer, web.Response):
        return offer
    sdp, page_session, as_json = offer
    overload = request.app[ADMISSION].overload() if ADMISSION in request.app else None
    if overload is not None:
        request.app[ADMISSION].refused += 1
        registry.refused_overloaded += 1
        return error_response(503, "server_overloaded",
                              f"The server is too loaded to take another call ({overload}); try again shortly.",
                              headers={"Retry-After": "2"})
    if cluster is not None:
        try:
            slot = await cluster.take_slot()
        except (RedisError, OSError) as exc:
            logger.warning("cluster: taking a call slot failed: %s", exc)
            return _cluster_unavailable()
        call = registry.create(address, slot_taken=True) if slot else None
    else:
        call = registry.create(address)
    if call is not None and ADMISSION in request.app:
        request.app[ADMISSION].admitted()
    if call is None:
        registry.refused_full += 1
        where = "cluster" if cluster is not None else "server"
        return error_response(503, "too_many_calls",
                              f"The {where} is at its limit of {registry.settings.max_calls} concurrent calls; try again later.",
                              headers={"Retry-After": "5"})
    if cluster is not None:
        try:
            await cluster.call_started(call.id)
        except (RedisError, OSError) as exc:  # the heartbeat registers it within a second anyway
            logger.warning("cluster: registering call %s failed: %s", call.id, exc)
    # SDP work and the upstream handshake run side by side: call set-up costs the
    # slower of the two, and a refusing upstream is answered here, precisely.
    answer, upstream = await asyncio.gather(call.accept(sdp), call.open_upstream(), return_exceptions=True)
    if isinstance(answer, BaseException) or isinstance(upstream, BaseException):
        if isinstance(answer, PortsExhausted):
            reply = error_response(503, "rtc_ports_exhausted", f"The server has no free media port ({answer.strerror}); "
                                   "try again shortly.", headers={"Retry-After": "5"})
        elif isinstance(answer, BaseException):
            # aiortc raises ValueError/InvalidAccessError etc. on SDP it cannot use
            reply = error_response(400, "invalid_offer", f"Could not apply the SDP offer: {answer}", param="sdp")
        elif isinstance(upstream, UpstreamBusy):  # the model service is rate-limiting: the caller may retry
            reply = error_response(503, "upstream_busy", f"{upstream}; try again later.",
                                   headers={"Retry-After": upstream.retry_after})
        elif isinstance(upstream, UpstreamError):
            reply = error_response(502, "upstream_unavailable", f"{upstream}.")
        else:
            logger.error("call %s: upstream set-up failed", call.id, exc_info=upstream)
            reply = error_response(502, "upstream_unavailable", "The upstream session could not be opened.")
        call.end(f"set-up failed: {reply.status}", tell_page=False)
        await call.wait_closed()
        return reply
    if registry.draining or call.reason is not None:  # SIGTERM while the offer was being answered
        call.end("server shutting down", tell_page=False)
        await call.wait_closed()
        return _shutting_down()
    for session in (key_session, page_session):
        if not session:
            continue
        verdict = registry.policy.check(events.dumps(events.session_update(session)))
        if verdict.forward:
            call.send_setup(verdict.forward)
        for err in verdict.errors:
            call.to_page(err)
    call.start()
    logger.info("call %s created (%d active)", call.id, len(registry.calls))
    return _answer(call, answer, as_json, 201)


async def _place(request: web.Request, registry: CallRegistry, cluster: ClusterNode) -> Optional[web.Response]:
    """Put a new offer on the least-loaded node that can take it: None to make the call here,
    or the answer of the node it was forwarded to (relayed as it came), or a refusal."""
    me = cluster.me(registry.draining)
    try:
        candidates = cluster.placement(await cluster.nodes(), me)
    except (RedisError, OSError) as exc:
        logger.warning("cluster: reading the node registry failed: %s", exc)
        return _cluster_unavailable()
    logger.debug("cluster: placing an offer: %s", ", ".join(f"{n.id}={n.active}{'*' if n.overload else ''}"
                                                          for n in candidates) or "no node")
    if not candidates:
        if registry.draining:
            return _shutting_down()
        return error_response(503, "server_overloaded", "No node of the cluster can take another call now; try again "
                              "shortly.", headers={"Retry-After": "2"})
    if candidates[0].id == cluster.id:
        return None
    body = await _raw_body(request)
    if isinstance(body, web.Response):
        return body
    headers = internal_headers(request)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for node in [c for c in candidates if c.id != cluster.id][:3]:
            try:
                async with http.post(f"{node.url}/v1/realtime/calls", data=body, headers=headers) as r:
                    reply = await _relayed(r)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                logger.warning("cluster: node %s did not take an offer: %s", node.id, type(exc).__name__)
                continue
            if reply.status == 503 and _error_code(reply) in TRY_ANOTHER_NODE:
                continue  # that node got loaded or began draining since its last heartbeat: the next one
            if reply.status in (200, 201):
                cluster.placed(node.id)
            return reply
    return error_response(503, "server_overloaded", "The nodes that could take this call did not; try again shortly.",
                          headers={"Retry-After": "1"})


#: A node refusing an offer for one of these reasons leaves it to the next one.
TRY_ANOTHER_NODE = ("server_overloaded", "server_shutting_down", "rtc_ports_exhausted", "upstream_busy")


def _error_code(reply: web.Response) -> Optional[str]:
    try:
        return json.loads(reply.body or b"{}").get("error", {}).get("code")
    except (ValueError, AttributeError):
        return None


def _answer(call: Call, answer: str, as_json: bool, status: int) -> web.Response:
    headers = {"Location": f"/v1/realtime/calls/{call.id}", "X-Reconnect-Secret": call.secret}
    if call.node_id:
        headers[NODE_HEADER] = call.node_id
    if as_json:
        return web.json_response({"type": "answer", "sdp": answer, "call_id": call.id,
                                  "reconnect_secret": call.secret}, status=status, headers=headers)
    return web.Response(status=status, text=answer, content_type="application/sdp", headers=headers)


async def reconnect(request: web.Request) -> web.Response:
    """A new peer for a live call (the caller's network changed): authorised by the call's
    reconnect secret, answered like an offer; the conversation carries on."""
    registry = request.app[REGISTRY]
    found = await _call_of(request, "reconnect")
    if isinstance(found, web.Response):
        return found
    call, call_id = found, request.match_info["call_id"]
    if call.reason is not None:
        return error_response(404, "call_not_found", f"No active call with id '{call_id}'.", param="call_id")
    if registry.draining:
        return _shutting_down()
    presented = bearer(request) or ""
    if not hmac.compare_digest(presented.encode(), call.secret.encode()):
        return error_response(403, "invalid_reconnect_secret",
                              "This call's reconnect secret is needed ('Authorization: Bearer <secret>', from the "
                              "X-Reconnect-Secret header or the latest call.reconnect_info event); it changes "
                              "after every re-attach.")
    offer = await _read_offer(request)
    if isinstance(offer, web.Response):
        return offer
    sdp, _session, as_json = offer
    try:
        answer = await call.reattach(sdp)
    except CallEnded as exc:
        return error_response(404, "call_not_found", str(exc), param="call_id")
    except Exception as exc:  # aiortc refusing the offer: the call goes on waiting for a usable one
        return error_response(400, "invalid_offer", f"Could not apply the SDP offer: {exc}", param="sdp")
    logger.info("call %s re-attached (%d so far)", call.id, call.reattaches)
    return _answer(call, answer, as_json, 200)


async def client_secret(request: web.Request) -> web.Response:
    """Mint an ephemeral key, in OpenAI's request/response shape."""
    keys = request.app[KEYS]
    if keys.required and not keys.is_token(bearer(request)):
        return _unauthorized("Minting keys needs 'Authorization: Bearer <BRIDGE_AUTH_TOKEN>'.")
    if request.content_length and request.content_length > MAX_OFFER_BYTES:
        return error_response(413, "body_too_large", f"Request body exceeds {MAX_OFFER_BYTES} bytes.")
    body: Any = {}
    if request.can_read_body:
        if request.content_type != "application/json":
            return error_response(415, "unsupported_media_type", "Send application/json.")
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                body = parse_json(await read_body(request) or b"{}")
        except TimeoutError:
            return _body_timeout()
        except (ValueError, _TooLarge, _BadRequest):
            return error_response(400, "invalid_json", "Request body is not valid JSON (or is too large).")
    if not isinstance(body, dict):
        return error_response(400, "invalid_json", "Request body must be a JSON object.")
    expires_after = body.get("expires_after")
    if expires_after is not None and not isinstance(expires_after, dict):
        return error_response(400, "invalid_value", "'expires_after' must be an object like {\"seconds\": 600}.",
                              param="expires_after")
    ttl = (expires_after or {}).get("seconds", DEFAULT_TTL_S)
    if not isinstance(ttl, int) or not MIN_TTL_S <= ttl <= MAX_TTL_S:
        return error_response(400, "invalid_value", f"expires_after.seconds must be an integer from {MIN_TTL_S} to {MAX_TTL_S}.",
                              param="expires_after.seconds")
    session = body.get("session")
    if session is not None and not isinstance(session, dict):
        return error_response(400, "invalid_value", "'session' must be an object.", param="session")
    try:
        key = keys.mint(ttl, session)
    except KeyTooLarge as exc:
        return error_response(400, "invalid_value", f"Cannot mint this key: {exc}.", param="session")
    return web.json_response({"value": key.value, "expires_at": int(key.expires_at), "session": session or {}})


async def hangup(request: web.Request) -> web.Response:
    found = await _call_of(request, "hangup")
    if isinstance(found, web.Response):
        return found
    call, call_id = found, request.match_info["call_id"]
    call.end("hung up by the client", tell_page=False)
    await call.wait_closed()
    return web.json_response({"id": call_id, "status": "ended"})


async def _call_of(request: web.Request, action: str) -> "Call | web.Response":
    """The call a per-call route names, held by this process; or the answer: a 404, or the
    reply of the worker or node that holds it (the request forwarded there as `action`)."""
    found = await find_call(request.app[REGISTRY], request.match_info["call_id"])
    if isinstance(found, str):
        return await _forward(found, request, action)
    return found


async def find_call(registry: CallRegistry, call_id: str) -> "Call | str | web.Response":
    """A live call of this process; the base URL of the worker or node that holds it; or the
    error to answer (404 for an id no live call has, 503 if the cluster cannot be asked)."""
    if not CALL_ID.fullmatch(call_id):
        return error_response(404, "call_not_found", "No active call with that id.", param="call_id")
    call = registry.calls.get(call_id)
    if call is not None:
        return call
    try:
        base = await elsewhere(registry, call_id)
    except ClusterUnavailable:
        return _cluster_unavailable()
    if base is not None:
        return base
    return error_response(404, "call_not_found", f"No active call with id '{call_id}'.", param="call_id")


class ClusterUnavailable(Exception):
    pass


def _cluster_unavailable() -> web.Response:
    return error_response(503, "cluster_unavailable", "The cluster's registry (Redis) cannot be reached; try again "
                          "shortly.", headers={"Retry-After": "2"})


async def elsewhere(registry: CallRegistry, call_id: str, *, ended: bool = False) -> Optional[str]:
    """The base URL of the worker or node that holds `call_id` (`ended`: whose record store
    has it), if that is not this process; None if no live one does. Only well-formed ids
    get here (the id goes into a URL path)."""
    if not CALL_ID.fullmatch(call_id):
        return None
    owner = registry.workers.owner(call_id)
    if owner is not None and owner != registry.workers.index:
        return f"http://127.0.0.1:{registry.workers.internal_ports[owner]}"
    if registry.cluster is not None:
        try:
            node = await registry.cluster.owner(call_id, ended=ended)
        except (RedisError, OSError) as exc:
            logger.warning("cluster: looking up call %s failed: %s", call_id, exc)
            raise ClusterUnavailable from None
        if node is not None and node.id != registry.cluster.id:
            return node.url
    return None


def internal_headers(request: web.Request) -> dict[str, str]:
    """What a request passed to a sibling worker or another node carries: its credentials
    and body type, and (to another node) the cluster's token."""
    headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
    cluster = request.app[REGISTRY].cluster
    if cluster is not None:
        headers[CLUSTER_HEADER] = cluster.token
    return headers


async def _forward(base: str, request: web.Request, action: str, query: str = "") -> web.Response:
    """The call lives in another worker process or node: pass the request on to it (the id
    is well-formed: `elsewhere` checked it). `action`: the path after the call's own ('' for
    the call itself)."""
    call_id = request.match_info["call_id"]
    path = f"/v1/realtime/calls/{call_id}" + (f"/{action}" if action else "") + (f"?{query}" if query else "")
    headers = internal_headers(request)
    body = await _raw_body(request)
    if isinstance(body, web.Response):
        return body
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
            async with http.request(request.method, f"{base}{path}", data=body, headers=headers) as r:
                return await _relayed(r)
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return error_response(503, "worker_unavailable", "The worker or node holding this call did not answer.",
                              headers={"Retry-After": "1"})


RELAYED_HEADERS = ("Location", "X-Reconnect-Secret", "Retry-After", NODE_HEADER)


async def _relayed(r: aiohttp.ClientResponse) -> web.Response:
    passed = {k: v for k, v in r.headers.items() if k in RELAYED_HEADERS}
    return web.Response(status=r.status, body=await r.read(), headers=passed, content_type=r.content_type)


async def _siblings(request: web.Request, path: str, *, text: bool = False) -> list:
    """The same report from every other worker process (over loopback), for a whole-server view."""
    workers = request.app[REGISTRY].workers
    if workers.count == 1 or "local" in request.query:
        return []
    query = urlencode([("local", "1"), *((k, v) for k, v in request.query.items() if k == "since")])
    return await gather_reports([f"http://127.0.0.1:{port}{path}?{query}"
                                 for i, port in enumerate(workers.internal_ports) if i != workers.index], text=text)


async def gather_reports(urls: list[str], *, headers: Optional[dict[str, str]] = None, text: bool = False) -> list:
    """GET each URL (other workers, other nodes) at once: the JSON (or text) of those that
    answered 200; the others are left out of the view, not waited for past 5 s."""
    async def one(http: aiohttp.ClientSession, url: str):
        try:
            async with http.get(url, headers=headers) as r:
                if r.status != 200:
                    return None
                return await r.text() if text else await r.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        return [x for x in await asyncio.gather(*(one(http, u) for u in urls)) if x is not None]


def _combine(reports: list[dict]) -> dict:
    """Numbers add up across workers, except percentiles and maxima: those take the worst worker.
    A key one worker lacks (a counter it has not had a call to report yet) counts as absent."""
    out: dict = {}
    keys = list(dict.fromkeys(k for r in reports for k in r))
    for key in keys:
        values = [r[key] for r in reports if r.get(key) is not None]
        if not values:
            out[key] = None
            continue
        value = values[0]
        if isinstance(value, dict):
            out[key] = _combine([v for v in values if isinstance(v, dict)])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers = [v for v in values if isinstance(v, (int, float))]
            worst = key in ("p50", "p95", "p99", "max")
            out[key] = max(numbers) if worst else round(sum(numbers), 2)
        else:
            out[key] = value
    return out


async def healthz(request: web.Request) -> web.Response:
    """Readiness; with several workers, calls are counted over all of them."""
    reports = [_health(request), *await _siblings(request, "/healthz")]
    combined = _combine(reports)
    combined["worker"], combined["workers"] = reports[0]["worker"], reports[0]["workers"]
    combined["max_calls"] = reports[0]["max_calls"]  # one limit for the whole server, not per worker
    return web.json_response(combined)


async def readyz(request: web.Request) -> web.Response:
    """For a load balancer: 200 while this process takes calls, 503 (with the reason) when it
    is full or too loaded for another."""
    registry = request.app[REGISTRY]
    reason = "draining" if registry.draining else None
    if reason is None and ADMISSION in request.app:
        reason = request.app[ADMISSION].overload()
    if reason is None and registry.full:
        reason = f"at its limit of {registry.max_calls} calls"
    if reason:
        return error_response(503, "not_ready", f"Not taking calls: {reason}.", headers={"Retry-After": "2"})
    return web.json_response({"ready": True, "active_calls": len(registry.calls)})


def _health(request: web.Request) -> dict:
    registry = request.app[REGISTRY]
    settings = request.app[SETTINGS]
    return {
        "status": "ok",
        "active_calls": len(registry.calls),
        "max_calls": registry.max_calls,
        "total_calls": registry.total,
        "worker": registry.workers.index,
        "workers": registry.workers.count,
        "upstream": "local" if settings.uses_local_backend else "remote",
        "draining": registry.draining,
        **({"node": registry.cluster.id, "cluster_redis": "ok" if registry.cluster.healthy else "unreachable"}
           if registry.cluster is not None else {}),
    }


def recent_lateness(calls: Iterable[Call], since_s: float) -> list[float]:
    """How late (ms) the calls' outbound frames were over the last `since_s` seconds."""
    cutoff = time.monotonic() - since_s
    return [ms for c in calls for t, ms in c.playback.stats.lateness_ms if t >= cutoff]


def recent_lateness_p95(registry: CallRegistry, since_s: float = WINDOW_S) -> float:
    return float(percentiles(recent_lateness(registry.calls.values(), since_s))["p95"])


def _since(request: web.Request) -> float:
    try:
        return min(300.0, max(0.1, float(request.query.get("since", "60"))))
    except ValueError:
        return 60.0


async def metrics_json(request: web.Request) -> web.Response:
    """Server health as JSON; `?since=SECONDS` sets the loop-lag window (default 60). With
    several workers, counts add up and percentiles are the worst worker's."""
    return web.json_response(_combine([_metrics(request), *await _siblings(request, "/metrics.json")]))


async def metrics_prometheus(request: web.Request) -> web.Response:
    """Prometheus' text format (signaling/prom.py), every worker's samples in one page."""
    from .prom import CONTENT_TYPE, PROM

    siblings = await _siblings(request, "/metrics", text=True)
    return web.Response(body=request.app[PROM].exposition(siblings), headers={"Content-Type": CONTENT_TYPE})


def _metrics(request: web.Request) -> dict:
    from .metrics import LOOP_LAG, process_stats

    registry = request.app[REGISTRY]
    calls = list(registry.calls.values())
    lateness = recent_lateness(calls, _since(request))  # the same window as the loop lag
    return {
        "active_calls": len(calls),
        "total_calls": registry.total,
        "loop_lag_ms": request.app[LOOP_LAG].summary(_since(request)) if LOOP_LAG in request.app else None,
        "playback": {
            "frames": sum(c.playback.stats.frames for c in calls),
            "late_frames": sum(c.playback.stats.late_frames for c in calls),
            "reanchors": sum(c.playback.stats.reanchors for c in calls),
            "lateness_ms": percentiles(lateness),
        },
        "mic": _sum_counters(c.audio_counters()["uplink"] for c in calls),
        # how long the receive buffer held packets back waiting for missing ones (recent packets)
        "mic_hold_ms": percentiles(x for c in calls if c.receive_buffer for x in c.receive_buffer.stats.hold_ms),
        "downlink": _sum_counters(c.audio_counters()["downlink"] for c in calls),
        "echo": {"calls_with_echo": sum(c.echo.stats.detected for c in calls),
                 "cancelled_ms": sum(c.echo.stats.cancelled_ms for c in calls)},
        "process": process_stats(),
        "http_connections": request.app[GUARD].stats() if GUARD in request.app else None,
        "offers_refused": {"rate": registry.limits.refused_rate, "pending": registry.limits.refused_pending},
    }


def _sum_counters(per_call) -> dict:
    """Counters added up over calls; `frames`/`lost_frames` name the packets and lost frames
    of either audio path."""
    out: dict = {"frames": 0, "lost_frames": 0}
    for counters in per_call:
        for key, value in counters.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = round(out.get(key, 0) + value, 4)
        out["frames"] += counters.get("packets", 0)
        out["lost_frames"] += counters.get("lost", 0)
    return out


async def page_config(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return web.json_response({"ice_servers": settings.ice_config(), "opus_dtx": settings.opus_dtx,
                              "reconnect_grace_seconds": settings.reconnect_grace})


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(CLIENT_DIR / "index.html", headers={"Cache-Control": "no-cache"})


#: The page's files, listed once: a request names one of these or gets a JSON 404
#: (no path is ever built from the request).
CLIENT_FILES = {p.name: p for p in CLIENT_DIR.iterdir() if p.is_file()}


async def client_file(request: web.Request) -> web.StreamResponse:
    path = CLIENT_FILES.get(request.match_info["name"])
    if path is None:
        return error_response(404, "not_found", "No such file.")
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/realtime/calls", create_call)
    app.router.add_post("/v1/realtime/calls/{call_id}/hangup", hangup)
    app.router.add_post("/v1/realtime/calls/{call_id}/reconnect", reconnect)
    app.router.add_post("/v1/realtime/client_secrets", client_secret)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_prometheus)
    app.router.add_get("/metrics.json", metrics_json)
    app.router.add_get("/config.json", page_config)
    app.router.add_get("/", index)
    app.router.add_get("/client/{name}", client_file)
