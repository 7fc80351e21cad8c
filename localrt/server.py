"""The local backend's WebSocket endpoint: `GET /v1/realtime` (upgrade), GA protocol.

Served beside the bridge by `server.py` when no upstream is configured, and on
its own by `python -m localrt`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from aiohttp import WSMsgType, web

from realtime import events
from realtime.events import ErrorCode
from settings import Settings

from .responder import make_responder
from .session import MAX_MESSAGE_BYTES, LocalSession
from .stt import STTPool
from .tts import espeak_available

logger = logging.getLogger(__name__)

SESSIONS = web.AppKey("local_sessions", set)
LOCAL_SETTINGS = web.AppKey("local_settings", Settings)
STT_POOL = web.AppKey("stt_pool", STTPool)


async def realtime_ws(request: web.Request) -> web.StreamResponse:
    settings = request.app[LOCAL_SETTINGS]
    if request.headers.get("OpenAI-Beta", "").startswith("realtime="):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(events.dumps(events.error(
            "The beta Realtime API shape is not supported; connect without the OpenAI-Beta header.",
            code="beta_api_shape_disabled")))
        await ws.close(code=4000, message=b"beta_api_shape_disabled")
        return ws
    # A little over the protocol's cap, so an oversized event gets an error event, not a closed socket.
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES + 1024 * 1024, heartbeat=30, compress=False)
    await ws.prepare(request)
    lock = asyncio.Lock()

    async def send(event: dict) -> None:
        if ws.closed:
            return
        async with lock:
            await ws.send_str(events.dumps(event))

    session = LocalSession(send, make_responder(settings.local_responder, settings.local_llm_model),
                           request.app[STT_POOL], model=request.query.get("model", "local"), voice=settings.voice,
                           instructions=settings.instructions)
    request.app[SESSIONS].add(session)
    logger.info("local session %s opened (%d active)", session.id, len(request.app[SESSIONS]))
    try:
        await session.start()
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await session.handle(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await send(events.error("Binary frames are not supported; send JSON text events.",
                                        code=ErrorCode.INVALID_VALUE))
            elif msg.type == WSMsgType.ERROR:
                break
    finally:
        await session.close()
        request.app[SESSIONS].discard(session)
        logger.info("local session %s closed", session.id)
    return ws


def add_local_routes(app: web.Application, settings: Settings, pool: STTPool) -> None:
    """Serve the backend at /v1/realtime of `app`, sharing `pool` (owned by the local app)."""
    app[SESSIONS] = set()
    app[LOCAL_SETTINGS] = settings
    app[STT_POOL] = pool
    app.router.add_get("/v1/realtime", realtime_ws)


def build_local_app(settings: Settings, stt_workers: Optional[int] = None) -> web.Application:
    if not espeak_available():
        raise SystemExit("error: the local backend needs espeak-ng (apt-get install espeak-ng, or ./run.sh does it)")
    try:
        make_responder(settings.local_responder, settings.local_llm_model)
    except ValueError as exc:
        raise SystemExit(f"config error: --local-responder (LOCAL_RESPONDER) = {settings.local_responder!r}: {exc}") from None
    app = web.Application()
    pool = STTPool(stt_workers)
    add_local_routes(app, settings, pool)

    async def lifecycle(app: web.Application):
        await pool.start()  # workers load their models now, not on the first utterance
        yield
        await pool.close()

    app.cleanup_ctx.append(lifecycle)
    return app
