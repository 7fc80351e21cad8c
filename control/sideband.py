"""The sideband: the operator's WebSocket onto a live call, as OpenAI's `?call_id=`.

`GET /v1/realtime?call_id=rtc_…` with the operator's credential (`BRIDGE_AUTH_TOKEN`)
upgrades to a WebSocket speaking the Realtime protocol for that call:

- it begins with a `session.created` holding the session as it stands, then
  receives every server event of the call the page receives (audio deltas too,
  with `?include_audio=true`);
- it may send client events, under the operator's policy (`SIDEBAND_CLIENT_EVENTS`,
  and session fields beyond the page's); what it sends goes upstream as if the
  page had sent it, and a refused event gets an `error` on this socket only;
- when the call ends it receives `call.ended` (`reason`, `end_category`,
  `record_url`), then a close (1000). This is what OpenAI's sideband lacks: it is
  never left guessing whether the browser went away.

A slow reader is not allowed to hold memory: past MAX_QUEUED unsent events it is
closed (1008). Several sidebands may watch one call.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Optional

from aiohttp import WSMsgType, web

from realtime import events
from realtime.events import ErrorCode, Event, Server
from realtime.policy import ClientEventPolicy
from realtime.redaction import redact

from .records import end_category

if TYPE_CHECKING:
    from realtime.call import Call

logger = logging.getLogger(__name__)

MAX_QUEUED = 4096
CALL_ENDED = "call.ended"
_CLOSE = object()


class Sideband:
    def __init__(self, ws: web.WebSocketResponse, call: "Call", policy: ClientEventPolicy, *,
                 include_audio: bool) -> None:
        self.ws = ws
        self.call = call
        self.policy = policy
        self.include_audio = include_audio
        self._queue: asyncio.Queue = asyncio.Queue()
        self._overflowed = False
        self.sent = 0
        self.received = 0

    # -- from the call (synchronous: never waits on the socket) ---------------------

    def event(self, event: Event) -> None:
        self._put(event)

    def audio(self, event: Event) -> None:
        if self.include_audio:
            self._put(event)

    def call_ended(self, reason: str) -> None:
        self._put({"type": CALL_ENDED, "event_id": events.event_id(), "call_id": self.call.id, "reason": reason,
                   "end_category": end_category(reason), "record_url": f"/v1/realtime/calls/{self.call.id}"})
        self._queue.put_nowait(_CLOSE)

    def _put(self, event: Event) -> None:
        if self._overflowed:
            return
        if self._queue.qsize() >= MAX_QUEUED:
            self._overflowed = True
            self._queue.put_nowait(_CLOSE)
            return
        self._queue.put_nowait(event)

    # -- the socket ------------------------------------------------------------------

    async def run(self, session: Optional[Event]) -> None:
        """Serve the socket until the call ends or the operator closes it."""
        call = self.call
        self._put({"type": Server.SESSION_CREATED, "event_id": events.event_id(), "session": session or {}})
        call.sidebands.add(self)
        writer = asyncio.get_running_loop().create_task(self._write())
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.TEXT:
                    self.received += 1
                    self._on_message(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    self._put(events.error("The sideband takes JSON text messages.", code=ErrorCode.INVALID_JSON))
                else:
                    break
        finally:
            call.sidebands.discard(self)
            if call.reason is None:  # the operator left: nothing more to say
                self._queue.put_nowait(_CLOSE)
            try:
                await asyncio.wait_for(writer, 2.0)
            except (asyncio.TimeoutError, ConnectionError):
                writer.cancel()
            await self.ws.close()

    def _on_message(self, message: str) -> None:
        if self.call.reason is not None:
            return
        verdict = self.policy.check(message)
        for err in verdict.errors:
            self._put(err)
        if verdict.forward is not None:
            self.call.from_client(verdict.forward, "sideband")

    async def _write(self) -> None:
        while True:
            event = await self._queue.get()
            if event is _CLOSE:
                if self._overflowed:
                    logger.warning("call %s: a sideband fell %d events behind and was closed", self.call.id, MAX_QUEUED)
                    await self.ws.close(code=1008, message=b"sideband too slow")
                else:
                    await self.ws.close(code=1000, message=b"call ended" if self.call.reason else b"")
                return
            try:
                await self.ws.send_str(redact(events.dumps(event)))
                self.sent += 1
            except (ConnectionError, RuntimeError):  # the operator went away
                return
