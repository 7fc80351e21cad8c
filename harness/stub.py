"""A protocol-faithful Realtime server stub for tests and benchmarks.

It speaks the GA event shapes over a real WebSocket, records every client event
and every appended audio byte (with arrival times on the monotonic clock), and
answers on command: a response whose audio is a tone, with a transcript. It
checks truncations the way OpenAI does (audio_end_ms beyond the audio sent is an
error). In `auto` mode a simple energy detector plays the server VAD, so a real
browser can hold a conversation with it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from websockets.asyncio.server import ServerConnection, serve

from media.audio import FRAME_BYTES, REALTIME_RATE, rms_dbfs, samples_to_ms, tone
from realtime import events
from realtime.events import Client, ErrorCode, Server


@dataclass
class StubSession:
    ws: ServerConnection
    headers: dict[str, str]
    path: str
    session: dict[str, Any] = field(default_factory=lambda: {"type": "realtime", "model": "stub"})
    received: list[dict] = field(default_factory=list)  # non-audio client events
    audio: bytearray = field(default_factory=bytearray)
    audio_arrivals: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, total bytes after)
    item_audio_ms: dict[str, int] = field(default_factory=dict)
    truncations: list[dict] = field(default_factory=list)
    stub_errors: list[str] = field(default_factory=list)  # events this stub could not handle
    active_response: Optional[str] = None
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    # auto-VAD state
    speaking: bool = False
    loud_ms: int = 0
    quiet_ms: int = 0
    scan_pos: int = 0
    vad_item: str = ""

    async def send(self, event: dict) -> None:
        event.setdefault("event_id", events.event_id())
        await self.ws.send(json.dumps(event))

    def events_of(self, kind: str) -> list[dict]:
        return [e for e in self.received if e.get("type") == kind]


class RealtimeStub:
    def __init__(self, *, auto: bool = False, reply_freq: float = 440.0, reply_ms: int = 1500,
                 reply_text: str = "I hear you loud and clear.", user_text: str = "hello stub",
                 realtime_pacing: bool = False, host: str = "127.0.0.1") -> None:
        self.host = host
        self.auto = auto
        self.reply_freq = reply_freq
        self.reply_ms = reply_ms
        self.reply_text = reply_text
        self.user_text = user_text
        self.realtime_pacing = realtime_pacing
        self.sessions: list[StubSession] = []
        self.connected = asyncio.Event()
        self._server = None
        self.url = ""
        self.refuse_status: Optional[int] = None
        self.refuse_headers: dict[str, str] = {}
        #: accept the WebSocket, then say nothing at all (no session.created)
        self.silent = False

    async def start(self) -> "RealtimeStub":
        self._server = await serve(self._handler, self.host, 0, max_size=16 * 1024 * 1024,
                                   process_request=self._process_request)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"ws://{self.host}:{port}/v1/realtime"
        return self

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> "RealtimeStub":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def _process_request(self, connection, request):
        if self.refuse_status:
            response = connection.respond(self.refuse_status, "refused by stub\n")
            for name, value in self.refuse_headers.items():
                response.headers[name] = value
            return response
        return None

    @property
    def session(self) -> StubSession:
        return self.sessions[-1]

    async def wait_session(self, timeout: float = 10.0) -> StubSession:
        await asyncio.wait_for(self.connected.wait(), timeout)
        return self.session

    async def _handler(self, ws: ServerConnection) -> None:
        s = StubSession(ws, dict(ws.request.headers), ws.request.path)
        self.sessions.append(s)
        self.connected.set()
        if self.silent:
            await ws.wait_closed()
            return
        await s.send({"type": Server.SESSION_CREATED, "session": s.session})
        try:
            async for message in ws:
                try:
                    await self._on_event(s, json.loads(message))
                except Exception as exc:  # the stub's own limits: recorded, and the session goes on
                    s.stub_errors.append(f"{type(exc).__name__}: {exc}")
        except Exception:
            pass  # the bridge went away

    async def _on_event(self, s: StubSession, event: dict) -> None:
        kind = event.get("type")
        if kind == Client.INPUT_AUDIO_APPEND:
            s.audio += base64.b64decode(event["audio"])
            s.audio_arrivals.append((time.monotonic(), len(s.audio)))
            if self.auto:
                await self._auto_vad(s)
            return
        s.received.append(event)
        if kind == Client.SESSION_UPDATE:
            _merge(s.session, event.get("session") or {})
            await s.send({"type": Server.SESSION_UPDATED, "session": s.session})
        elif kind == Client.ITEM_TRUNCATE:
            s.truncations.append(event)
            have = s.item_audio_ms.get(event.get("item_id"), 0)
            if event.get("audio_end_ms", 0) > have:
                await s.send(events.error(
                    f"Audio content of {have}ms is already shorter than {event['audio_end_ms']}ms",
                    code="invalid_value", param="audio_end_ms"))
            else:
                await s.send({"type": Server.ITEM_TRUNCATED, "item_id": event["item_id"],
                              "content_index": 0, "audio_end_ms": event["audio_end_ms"]})
        elif kind == Client.RESPONSE_CREATE:
            asyncio.ensure_future(self.respond(s))
        elif kind == Client.RESPONSE_CANCEL:
            if s.active_response:
                s.cancel.set()
            else:
                await s.send(events.error("no active response", code=ErrorCode.CANCEL_NOT_ACTIVE))
        elif kind == Client.ITEM_CREATE:
            item = dict(event.get("item") or {})
            item.setdefault("id", events.new_id("item"))
            await s.send({"type": Server.ITEM_ADDED, "item": item})
            await s.send({"type": Server.ITEM_DONE, "item": item})

    async def _auto_vad(self, s: StubSession) -> None:
        while len(s.audio) - s.scan_pos >= FRAME_BYTES:
            frame = bytes(s.audio[s.scan_pos:s.scan_pos + FRAME_BYTES])
            s.scan_pos += FRAME_BYTES
            loud = rms_dbfs(frame) > -40
            if not s.speaking:
                s.loud_ms = s.loud_ms + 20 if loud else 0
                if s.loud_ms >= 100:
                    s.speaking, s.quiet_ms = True, 0
                    item = events.new_id("item")
                    s.vad_item = item
                    await s.send({"type": Server.SPEECH_STARTED, "item_id": item,
                                  "audio_start_ms": samples_to_ms(s.scan_pos // 2) - 100})
            else:
                s.quiet_ms = 0 if loud else s.quiet_ms + 20
                if s.quiet_ms >= 500:
                    s.speaking, s.loud_ms = False, 0
                    item = s.vad_item
                    await s.send({"type": Server.SPEECH_STOPPED, "item_id": item,
                                  "audio_end_ms": samples_to_ms(s.scan_pos // 2)})
                    await s.send({"type": Server.INPUT_COMMITTED, "item_id": item, "previous_item_id": None})
                    await s.send({"type": Server.INPUT_TRANSCRIPTION_COMPLETED, "item_id": item,
                                  "content_index": 0, "transcript": self.user_text})
                    asyncio.ensure_future(self.respond(s))

    async def respond(self, s: Optional[StubSession] = None, *, freq: Optional[float] = None,
                      ms: Optional[int] = None, text: Optional[str] = None, chunk_ms: int = 100,
                      marker: bool = False) -> dict:
        """Send a full GA response whose audio is a tone. Returns ids and the audio sent."""
        s = s or self.session
        freq = freq or self.reply_freq
        ms = ms or self.reply_ms
        text = text if text is not None else self.reply_text
        rid, item_id = events.new_id("resp"), events.new_id("item")
        s.active_response, s.item_audio_ms[item_id] = rid, 0
        s.cancel.clear()
        base = {"response_id": rid, "item_id": item_id, "output_index": 0, "content_index": 0}
        item = {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress",
                "content": [{"type": "output_audio", "transcript": ""}]}
        await s.send({"type": Server.RESPONSE_CREATED,
                      "response": {"id": rid, "object": "realtime.response", "status": "in_progress", "output": []}})
        await s.send({"type": Server.OUTPUT_ITEM_ADDED, "response_id": rid, "output_index": 0, "item": item})
        await s.send({"type": Server.ITEM_ADDED, "item": item})
        await s.send({"type": Server.CONTENT_PART_ADDED, **base, "part": {"type": "output_audio", "transcript": ""}})
        pcm = tone(freq, ms)
        words = text.split()
        step = FRAME_BYTES * chunk_ms // 20
        status = "completed"
        sent_at = []
        n_chunks = max(1, (len(pcm) + step - 1) // step)
        for i in range(n_chunks):
            if s.cancel.is_set():
                status = "cancelled"
                break
            chunk = pcm[i * step:(i + 1) * step]
            await s.send({"type": Server.OUTPUT_AUDIO_DELTA, **base, "delta": base64.b64encode(chunk).decode()})
            sent_at.append(time.monotonic())
            s.item_audio_ms[item_id] += samples_to_ms(len(chunk) // 2)
            w = words[i * len(words) // n_chunks:(i + 1) * len(words) // n_chunks]
            if w:
                await s.send({"type": Server.OUTPUT_TRANSCRIPT_DELTA, **base, "delta": " ".join(w) + " "})
            await asyncio.sleep(chunk_ms / 1000 if self.realtime_pacing else 0)
        await s.send({"type": Server.OUTPUT_AUDIO_DONE, **base})
        await s.send({"type": Server.OUTPUT_TRANSCRIPT_DONE, **base, "transcript": text})
        await s.send({"type": Server.CONTENT_PART_DONE, **base, "part": {"type": "output_audio", "transcript": text}})
        item["status"] = "completed" if status == "completed" else "incomplete"
        await s.send({"type": Server.OUTPUT_ITEM_DONE, "response_id": rid, "output_index": 0, "item": item})
        await s.send({"type": Server.RESPONSE_DONE, "response": {
            "id": rid, "object": "realtime.response", "status": status, "output": [item], "usage": {"total_tokens": 100, "input_tokens": 60, "output_tokens": 40}}})
        s.active_response = None
        return {"response_id": rid, "item_id": item_id, "audio_ms": s.item_audio_ms[item_id], "sent_at": sent_at}

    async def call_function(self, name: str, arguments: str, s: Optional[StubSession] = None,
                            call_id: Optional[str] = None, status: str = "completed") -> dict:
        """A response whose only output is a function call (as the GA API sends it); `status`
        of the response: "cancelled" as when the caller spoke over it."""
        s = s or self.session
        rid, item_id, call_id = events.new_id("resp"), events.new_id("item"), call_id or events.new_id("call")
        item = {"id": item_id, "type": "function_call", "status": "in_progress", "name": name, "call_id": call_id,
                "arguments": ""}
        await s.send({"type": Server.RESPONSE_CREATED,
                      "response": {"id": rid, "object": "realtime.response", "status": "in_progress", "output": []}})
        await s.send({"type": Server.OUTPUT_ITEM_ADDED, "response_id": rid, "output_index": 0, "item": item})
        await s.send({"type": Server.ITEM_ADDED, "item": item})
        base = {"response_id": rid, "item_id": item_id, "output_index": 0, "call_id": call_id}
        await s.send({"type": Server.FUNCTION_ARGS_DELTA, **base, "delta": arguments})
        await s.send({"type": Server.FUNCTION_ARGS_DONE, **base, "name": name, "arguments": arguments})
        item = {**item, "status": "completed", "arguments": arguments}
        await s.send({"type": Server.OUTPUT_ITEM_DONE, "response_id": rid, "output_index": 0, "item": item})
        await s.send({"type": Server.ITEM_DONE, "item": item})
        await s.send({"type": Server.RESPONSE_DONE, "response": {
            "id": rid, "object": "realtime.response", "status": status, "output": [item],
            "usage": {"total_tokens": 30, "input_tokens": 20, "output_tokens": 10,
                      "input_token_details": {"text_tokens": 5, "audio_tokens": 15}}}})
        return {"response_id": rid, "item_id": item_id, "call_id": call_id}

    async def speech_started(self, s: Optional[StubSession] = None) -> str:
        s = s or self.session
        item = events.new_id("item")
        await s.send({"type": Server.SPEECH_STARTED, "item_id": item,
                      "audio_start_ms": samples_to_ms(len(s.audio) // 2)})
        return item

    async def drop(self, code: int = 1011, reason: str = "stub dropped the session") -> None:
        await self.session.ws.close(code, reason)


def _merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def audio_received_seconds(s: StubSession) -> float:
    return len(s.audio) / 2 / REALTIME_RATE

