"""One Realtime session of the local backend: the GA protocol's state machine.

It owns the session config, the input audio buffer and its timeline, the turn
detector, the conversation, and at most one active response. Events out go
through `send`; CPU work goes to worker threads (STT) or subprocesses (TTS).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import json
import logging
import re
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

import numpy as np

from media.audio import REALTIME_RATE, samples_to_ms
from media.resample import StreamResampler
from realtime import events
from realtime.events import Client, ErrorCode, Event, Server

from .endofturn import EAGERNESS, judge
from .responder import Responder, ResponderError, Said, ToolCall
from .stt import STTError, STTPool, Transcriber
from .tts import Speaker, TTSError
from .vad import VAD_RATE, TurnDetector

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 15 * 1024 * 1024
MIN_COMMIT_MS = 100
#: Semantic VAD: the speculative decode starts after this much quiet (pauses between words are shorter).
SPECULATE_AFTER_MS = 60
AUDIO_CHUNK_BYTES = REALTIME_RATE * 2 // 10  # 100 ms per output_audio.delta
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")

Send = Callable[[Event], Awaitable[None]]


def default_turn_detection(kind: str = "server_vad") -> dict[str, Any]:
    if kind == "semantic_vad":
        return {"type": "semantic_vad", "eagerness": "auto", "create_response": True, "interrupt_response": True}
    return {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 200,
            "idle_timeout_ms": None, "create_response": True, "interrupt_response": True}


class InvalidSession(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class Resampler16k:
    """24 kHz PCM16 → 16 kHz PCM16 (the rate of silero and pocketsphinx), stateful."""

    def __init__(self) -> None:
        self._r = StreamResampler(VAD_RATE)

    def __call__(self, pcm24: bytes) -> bytes:
        return self._r.pcm(pcm24, REALTIME_RATE).tobytes()


class LocalSession:
    def __init__(self, send: Send, responder: Responder, stt: STTPool, speaker: Speaker, *, model: str = "local",
                 voice: str = "alloy", instructions: str = "") -> None:
        self._send_raw = send
        self.responder = responder
        self.speaker = speaker
        self.id = events.new_id("sess")
        self.config: dict[str, Any] = {
            "type": "realtime", "object": "realtime.session", "id": self.id, "model": model,
            "output_modalities": ["audio"], "instructions": instructions,
            "tools": [], "tool_choice": "auto", "max_output_tokens": "inf", "tracing": None,
            "truncation": "auto", "prompt": None, "include": None,
            "expires_at": int(time.time()) + 3600,
            "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": REALTIME_RATE}, "transcription": None,
                          "noise_reduction": None, "turn_detection": default_turn_detection()},
                "output": {"format": {"type": "audio/pcm", "rate": REALTIME_RATE}, "voice": voice, "speed": 1.0},
            },
        }
        self.items: dict[str, dict[str, Any]] = {}  # conversation, in order
        self._audio_meta: dict[str, dict[str, Any]] = {}  # assistant item id → audio ms + sentence timings
        self._buffer = bytearray()  # input audio since the last commit/clear (24 kHz)
        self._input_samples = 0  # all input audio of the session (24 kHz samples): the VAD timeline
        self._to16k = Resampler16k()
        self._recent16k = bytearray()  # last second at 16 kHz, for prefix padding
        self._detector: Optional[TurnDetector] = None
        self._turn_item: Optional[str] = None
        self._predecoded = False  # a speculative decode of this turn was asked for, and still stands
        self._guess_gen = 0  # bumped whenever the speaker goes on: a guess of an older one is stale
        self._guess: Optional[str] = None  # the speculative transcript of the turn up to this silence
        self._guess_task: Optional[asyncio.Task] = None  # the decode that will give it
        self._guess_tasks: set[asyncio.Task] = set()  # every one under way (stale ones run out)
        self._turn16k = bytearray()  # the turn's audio at 16 kHz, as the recogniser hears it
        self._stt = Transcriber(stt)
        self._stt_jobs: asyncio.Queue = asyncio.Queue()
        self._stt_worker = asyncio.get_running_loop().create_task(self._run_stt())
        self._response: Optional[asyncio.Task] = None
        self._response_id: Optional[str] = None
        self._cancel_reason = "client_cancelled"
        self._voice_locked = False
        self._configure_detector()

    # -- plumbing ---------------------------------------------------------------------

    async def send(self, event: Event) -> None:
        event.setdefault("event_id", events.event_id())
        await self._send_raw(event)

    async def start(self) -> None:
        await self.send({"type": Server.SESSION_CREATED, "session": self.config})

    async def close(self) -> None:
        tasks = [t for t in (self._response, self._stt_worker, *self._guess_tasks) if t and not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._stt.close()

    async def _error(self, message: str, code: str, param: Optional[str] = None, client_event_id: Optional[str] = None) -> None:
        await self.send(events.error(message, code=code, param=param, client_event_id=client_event_id))

    @property
    def turn_detection(self) -> Optional[dict[str, Any]]:
        return self.config["audio"]["input"]["turn_detection"]

    # -- client events ------------------------------------------------------------------

    async def handle(self, message: str | bytes) -> None:
        if len(message) > MAX_MESSAGE_BYTES:
            await self._error(f"Message of {len(message)} bytes exceeds the maximum of {MAX_MESSAGE_BYTES} bytes.",
                              ErrorCode.MESSAGE_TOO_LARGE)
            return
        try:
            event = json.loads(message)
        except (ValueError, UnicodeDecodeError) as exc:
            await self._error(f"Invalid JSON: {exc}", ErrorCode.INVALID_JSON)
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            await self._error("Event must be an object with a string 'type'.", ErrorCode.MISSING_PARAMETER, "type")
            return
        kind, eid = event["type"], event.get("event_id")
        handler = self._handlers.get(kind)
        if handler is None:
            await self._error(f"Invalid event type '{kind}'.", ErrorCode.UNKNOWN_EVENT, "type", eid)
            return
        await handler(self, event)

    async def _on_session_update(self, event: Event) -> None:
        eid = event.get("event_id")
        update = event.get("session")
        if not isinstance(update, dict):
            await self._error("Missing required parameter: 'session'.", ErrorCode.MISSING_PARAMETER, "session", eid)
            return
        try:
            new = self._merged_config(update)
        except InvalidSession as exc:
            await self._error(str(exc), ErrorCode.INVALID_VALUE, exc.param, eid)
            return
        self.config = new
        self._configure_detector()
        await self.send({"type": Server.SESSION_UPDATED, "session": self.config})

    def _merged_config(self, update: dict[str, Any]) -> dict[str, Any]:
        cfg = copy.deepcopy(self.config)
        if "type" in update and update["type"] != "realtime":
            raise InvalidSession("session.type", f"Invalid session type '{update['type']}': only 'realtime' is supported.")
        if "instructions" in update:
            if not isinstance(update["instructions"], str):
                raise InvalidSession("session.instructions", "'instructions' must be a string.")
            cfg["instructions"] = update["instructions"]
        if "output_modalities" in update:
            mods = update["output_modalities"]
            if mods not in (["audio"], ["text"]):
                raise InvalidSession("session.output_modalities", "'output_modalities' must be ['audio'] or ['text'].")
            cfg["output_modalities"] = mods
        for key in ("tools", "tool_choice", "max_output_tokens", "tracing", "truncation", "prompt", "include"):
            if key in update:
                cfg[key] = update[key]
        audio = update.get("audio")
        if audio is not None and not isinstance(audio, dict):
            raise InvalidSession("session.audio", "'audio' must be an object.")
        audio_in = (audio or {}).get("input") or {}
        audio_out = (audio or {}).get("output") or {}
        for side, part in (("input", audio_in), ("output", audio_out)):
            fmt = part.get("format")
            if fmt is not None:
                if not isinstance(fmt, dict) or fmt.get("type") != "audio/pcm" or fmt.get("rate", REALTIME_RATE) != REALTIME_RATE:
                    raise InvalidSession(f"session.audio.{side}.format",
                                         "The local backend supports only {'type': 'audio/pcm', 'rate': 24000}.")
                cfg["audio"][side]["format"] = {"type": "audio/pcm", "rate": REALTIME_RATE}
        if "transcription" in audio_in:
            tr = audio_in["transcription"]
            if tr is not None and not isinstance(tr, dict):
                raise InvalidSession("session.audio.input.transcription", "'transcription' must be an object or null.")
            cfg["audio"]["input"]["transcription"] = tr
        if "noise_reduction" in audio_in:
            cfg["audio"]["input"]["noise_reduction"] = audio_in["noise_reduction"]
        if "turn_detection" in audio_in:
            cfg["audio"]["input"]["turn_detection"] = self._turn_detection(audio_in["turn_detection"])
        if "voice" in audio_out:
            voice = audio_out["voice"]
            if not isinstance(voice, str) or not voice:
                raise InvalidSession("session.audio.output.voice", "'voice' must be a non-empty string.")
            if self._voice_locked and voice != cfg["audio"]["output"]["voice"]:
                raise InvalidSession("session.audio.output.voice", "Cannot update a session's voice after the model has responded with audio.")
            cfg["audio"]["output"]["voice"] = voice
        if "speed" in audio_out:
            speed = audio_out["speed"]
            if not isinstance(speed, (int, float)) or not 0.25 <= speed <= 1.5:
                raise InvalidSession("session.audio.output.speed", "'speed' must be a number between 0.25 and 1.5.")
            cfg["audio"]["output"]["speed"] = float(speed)
        return cfg

    def _turn_detection(self, td: Any) -> Optional[dict[str, Any]]:
        param = "session.audio.input.turn_detection"
        if td is None:
            return None
        if not isinstance(td, dict):
            raise InvalidSession(param, "'turn_detection' must be an object or null.")
        kind = td.get("type", (self.turn_detection or {}).get("type", "server_vad"))
        if kind not in ("server_vad", "semantic_vad"):
            raise InvalidSession(param + ".type", f"Invalid turn_detection type '{kind}': use server_vad, semantic_vad or null.")
        current = self.turn_detection if self.turn_detection and self.turn_detection["type"] == kind else default_turn_detection(kind)
        merged = {**current, **{k: v for k, v in td.items() if k in current or k == "type"}}
        if kind == "server_vad":
            if not isinstance(merged["threshold"], (int, float)) or not 0.0 <= merged["threshold"] <= 1.0:
                raise InvalidSession(param + ".threshold", "'threshold' must be a number between 0 and 1.")
            for key in ("prefix_padding_ms", "silence_duration_ms"):
                if not isinstance(merged[key], int) or merged[key] < 0:
                    raise InvalidSession(f"{param}.{key}", f"'{key}' must be a non-negative integer.")
        elif merged.get("eagerness") not in EAGERNESS:
            raise InvalidSession(param + ".eagerness", "'eagerness' must be low, medium, high or auto.")
        return merged

    def _configure_detector(self) -> None:
        td = self.turn_detection
        if td is None:
            self._detector = None
            return
        if td["type"] == "server_vad":
            params = (td["threshold"], td["prefix_padding_ms"], td["silence_duration_ms"])
            extra: dict[str, Any] = {}
        else:
            timing = EAGERNESS[td["eagerness"]]
            params = (0.5, 300, timing.complete_ms)
            extra = {"max_silence_ms": timing.limit_ms, "may_end": self._may_end}
        if self._detector is None:
            self._detector = TurnDetector(*params, **extra)
        else:
            self._detector.configure(*params, **extra)

    def _may_end(self, quiet_ms: float) -> bool:
        """Semantic VAD: has the speaker been quiet long enough for what they said? Before
        the speculative transcript is back, the silence of an unsure verdict applies."""
        td = self.turn_detection or {}
        timing = EAGERNESS.get(td.get("eagerness", "auto"), EAGERNESS["auto"])
        if self._guess is None:
            # The turn's transcript is needed to answer anyway: while its speculative decode is
            # under way, ending the turn would only start the same decode again, later.
            return quiet_ms >= timing.unsure_ms and not self._predecoded
        return quiet_ms >= timing.silence_for(judge(self._guess))

    # -- input audio --------------------------------------------------------------------

    async def _on_append(self, event: Event) -> None:
        try:
            pcm = base64.b64decode(event.get("audio") or "", validate=True)
        except (binascii.Error, ValueError):
            await self._error("'audio' is not valid base64.", ErrorCode.INVALID_VALUE, "audio", event.get("event_id"))
            return
        if len(pcm) % 2:
            pcm = pcm[:-1]
        if not pcm:
            return
        start_ms = samples_to_ms(self._input_samples)
        self._buffer += pcm
        self._input_samples += len(pcm) // 2
        pcm16 = self._to16k(pcm)
        self._recent16k += pcm16
        del self._recent16k[:-VAD_RATE * 2]
        if self._detector is None:
            return
        speaking_before = self._detector.speaking
        turns = self._detector.feed(np.frombuffer(pcm16, dtype="<i2").astype(np.float32) / 32768.0)
        if speaking_before and not turns:
            self._stt_jobs.put_nowait(("feed", pcm16))
            self._turn16k += pcm16
            self._speculate()
        for turn in turns:
            if turn.kind == "start":
                await self._speech_started(turn.ms, now_ms=start_ms + samples_to_ms(len(pcm) // 2))
            else:
                await self._speech_stopped(turn.ms)

    def _speculate(self) -> None:
        """Once the speaker has paused a little, decode what was said: if the pause turns
        out to end the turn, the transcript is ready when the turn detector says so (and
        semantic VAD reads it to decide whether the turn is over)."""
        detector = self._detector
        assert detector is not None
        semantic = (self.turn_detection or {}).get("type") == "semantic_vad"
        # semantic VAD needs the transcript to decide: start on the voice's own silence
        quiet = detector.voice_quiet_ms if semantic else detector.quiet_ms
        start_at = SPECULATE_AFTER_MS if semantic else min(150, detector.silence_duration_ms / 2)
        if not self._predecoded and quiet >= start_at:
            self._predecoded = True
            task = self._guess_task = asyncio.get_running_loop().create_task(
                self._run_guess(self._guess_gen, bytes(self._turn16k)))
            self._guess_tasks.add(task)
            task.add_done_callback(self._guess_tasks.discard)
        elif quiet == 0 and (self._predecoded or self._guess is not None):
            self._predecoded = False  # they went on speaking: that guess is stale
            self._guess, self._guess_gen, self._guess_task = None, self._guess_gen + 1, None

    async def _run_guess(self, gen: int, pcm16: bytes) -> Optional[str]:
        """One speculative decode; its transcript stands if the speaker said nothing since."""
        try:
            text = await self._stt.guess(pcm16)
        except STTError as exc:
            logger.warning("session %s: speculative transcription failed: %s", self.id, exc)
            return None
        if gen == self._guess_gen and self._detector is not None and self._detector.speaking:
            self._guess = text
            for turn in self._detector.recheck():  # semantic VAD may end the turn now
                await self._speech_stopped(turn.ms)
        return text

    async def _speech_started(self, audio_start_ms: int, now_ms: int) -> None:
        item_id = self._turn_item = events.new_id("item")
        # keep only the audio from the padded start: the item is the utterance
        keep = min(len(self._buffer) // 2, (now_ms - audio_start_ms) * REALTIME_RATE // 1000)
        del self._buffer[: len(self._buffer) - keep * 2]
        await self.send({"type": Server.SPEECH_STARTED, "audio_start_ms": audio_start_ms, "item_id": item_id})
        td = self.turn_detection or {}
        if td.get("interrupt_response", True) and self._response is not None and not self._response.done():
            await self._cancel_response("turn_detected")
        prefix = (now_ms - audio_start_ms) * VAD_RATE // 1000 * 2
        self._predecoded = False
        self._guess, self._guess_gen, self._guess_task = None, self._guess_gen + 1, None
        self._turn16k = bytearray(self._recent16k[-prefix:]) if prefix > 0 else bytearray()
        self._stt_jobs.put_nowait(("begin", None))
        self._stt_jobs.put_nowait(("feed", bytes(self._recent16k[-prefix:]) if prefix > 0 else b""))

    async def _speech_stopped(self, audio_end_ms: int) -> None:
        item_id = self._turn_item or events.new_id("item")
        self._turn_item = None
        await self.send({"type": Server.SPEECH_STOPPED, "audio_end_ms": audio_end_ms, "item_id": item_id})
        auto = (self.turn_detection or {}).get("create_response", True)
        await self._commit(item_id, streaming=True, respond=auto)

    async def _on_commit(self, event: Event) -> None:
        if samples_to_ms(len(self._buffer) // 2) < MIN_COMMIT_MS:
            await self._error(
                f"Error committing input audio buffer: buffer too small. Expected at least {MIN_COMMIT_MS}ms of audio, "
                f"but buffer only has {samples_to_ms(len(self._buffer) // 2)}ms of audio.",
                ErrorCode.COMMIT_EMPTY, None, event.get("event_id"))
            return
        streaming = self._detector is not None and self._detector.speaking
        item_id = self._turn_item or events.new_id("item")
        self._turn_item = None
        if self._detector is not None:
            self._detector.reset()
        await self._commit(item_id, streaming=streaming, respond=False)

    async def _commit(self, item_id: str, *, streaming: bool, respond: bool) -> None:
        previous = next(reversed(self.items), None)
        audio, self._buffer = bytes(self._buffer), bytearray()
        await self.send({"type": Server.INPUT_COMMITTED, "previous_item_id": previous, "item_id": item_id})
        item = {"id": item_id, "object": "realtime.item", "type": "message", "status": "completed", "role": "user",
                "content": [{"type": "input_audio", "transcript": None}]}
        self.items[item_id] = item
        await self.send({"type": Server.ITEM_ADDED, "previous_item_id": previous, "item": item})
        await self.send({"type": Server.ITEM_DONE, "previous_item_id": previous, "item": item})
        if streaming:
            if self._guess is not None:  # nothing but silence since it was decoded: it is the turn's
                self._stt_jobs.put_nowait(("known", (item_id, respond, self._guess)))
            elif self._predecoded and self._guess_task is not None:  # under way: no sooner decoded again
                self._stt_jobs.put_nowait(("guess", (item_id, respond, self._guess_task)))
            else:
                self._stt_jobs.put_nowait(("finish", (item_id, respond)))
            self._predecoded, self._guess, self._guess_task = False, None, None
        else:
            self._stt_jobs.put_nowait(("whole", (item_id, Resampler16k()(audio), respond)))

    async def _on_clear(self, event: Event) -> None:
        self._buffer = bytearray()
        if self._detector is not None:
            self._detector.reset()
        self._turn_item = None
        await self.send({"type": Server.INPUT_CLEARED})

    async def _run_stt(self) -> None:
        """One worker per session keeps the decoder's calls in order."""
        while True:
            job, arg = await self._stt_jobs.get()
            try:
                if job == "begin":
                    await self._stt.begin()
                elif job == "feed":
                    if arg:
                        await self._stt.feed(arg)
                elif job == "known":
                    item_id, respond, text = arg
                    await self._transcribed(item_id, text, respond)
                elif job == "guess":
                    item_id, respond, task = arg
                    text = await task
                    await self._transcribed(item_id, text if text is not None else await self._stt.finish(), respond)
                elif job == "finish":
                    item_id, respond = arg
                    await self._transcribed(item_id, await self._stt.finish(), respond)
                elif job == "whole":
                    item_id, pcm16, respond = arg
                    await self._transcribed(item_id, await self._stt.transcribe(pcm16), respond)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken decoder must not kill the session
                logger.exception("session %s: transcription failed", self.id)
                if job in ("finish", "whole", "guess", "known"):
                    await self.send({"type": Server.INPUT_TRANSCRIPTION_FAILED, "item_id": arg[0], "content_index": 0,
                                     "error": {"type": "transcription_error", "code": "stt_failed", "message": str(exc)}})

    async def _transcribed(self, item_id: str, text: str, respond: bool) -> None:
        item = self.items.get(item_id)
        if item is not None:
            item["content"][0]["transcript"] = text
        if self.config["audio"]["input"]["transcription"] is not None:
            words = text.split()
            for i in range(0, len(words), 3):
                await self.send({"type": Server.INPUT_TRANSCRIPTION_DELTA, "item_id": item_id, "content_index": 0,
                                 "delta": " ".join(words[i:i + 3]) + (" " if i + 3 < len(words) else "")})
            await self.send({"type": Server.INPUT_TRANSCRIPTION_COMPLETED, "item_id": item_id, "content_index": 0,
                             "transcript": text, "usage": {"type": "duration", "seconds": 0}})
        if respond:
            await self.create_response({})

    # -- conversation items -------------------------------------------------------------

    async def _on_item_create(self, event: Event) -> None:
        eid = event.get("event_id")
        item = event.get("item")
        if not isinstance(item, dict):
            await self._error("Missing required parameter: 'item'.", ErrorCode.MISSING_PARAMETER, "item", eid)
            return
        kind = item.get("type", "message")
        if kind in ("function_call_output", "function_call"):
            await self._add_function_item(item, event)
            return
        if kind != "message":
            await self._error(f"Item type '{kind}' is not supported by the local backend.", ErrorCode.INVALID_VALUE, "item.type", eid)
            return
        if item.get("role") not in ("user", "assistant", "system"):
            await self._error("'item.role' must be user, assistant or system.", ErrorCode.INVALID_VALUE, "item.role", eid)
            return
        if not isinstance(item.get("content"), list):
            await self._error("'item.content' must be a list.", ErrorCode.INVALID_VALUE, "item.content", eid)
            return
        item = {"object": "realtime.item", "status": "completed", **item, "type": "message"}
        item.setdefault("id", events.new_id("item"))
        if item["id"] in self.items:
            await self._error(f"Item with id '{item['id']}' already exists.", ErrorCode.INVALID_VALUE, "item.id", eid)
            return
        previous = event.get("previous_item_id", next(reversed(self.items), None))
        self.items[item["id"]] = item
        await self.send({"type": Server.ITEM_ADDED, "previous_item_id": previous, "item": item})
        await self.send({"type": Server.ITEM_DONE, "previous_item_id": previous, "item": item})

    async def _add_function_item(self, item: dict[str, Any], event: Event) -> None:
        """A tool's result (`function_call_output`: call_id, output) or a call (`function_call`:
        call_id, name, arguments), for the model to read on its next response."""
        eid = event.get("event_id")
        needed = ("call_id", "output") if item["type"] == "function_call_output" else ("call_id", "name", "arguments")
        for key in needed:
            if not isinstance(item.get(key), str):
                await self._error(f"Missing required parameter: 'item.{key}' (a string).", ErrorCode.MISSING_PARAMETER,
                                  f"item.{key}", eid)
                return
        item = {"object": "realtime.item", "status": "completed", **{k: item[k] for k in needed},
                "type": item["type"], "id": item.get("id") if isinstance(item.get("id"), str) else events.new_id("item")}
        if item["id"] in self.items:
            await self._error(f"Item with id '{item['id']}' already exists.", ErrorCode.INVALID_VALUE, "item.id", eid)
            return
        previous = next(reversed(self.items), None)
        self.items[item["id"]] = item
        await self.send({"type": Server.ITEM_ADDED, "previous_item_id": previous, "item": item})
        await self.send({"type": Server.ITEM_DONE, "previous_item_id": previous, "item": item})

    async def _on_item_delete(self, event: Event) -> None:
        item_id = event.get("item_id")
        if self.items.pop(item_id, None) is None:
            await self._error(f"Item with item_id '{item_id}' not found.", ErrorCode.ITEM_NOT_FOUND, "item_id", event.get("event_id"))
            return
        self._audio_meta.pop(item_id, None)
        await self.send({"type": Server.ITEM_DELETED, "item_id": item_id})

    async def _on_item_retrieve(self, event: Event) -> None:
        item = self.items.get(event.get("item_id"))
        if item is None:
            await self._error(f"Item with item_id '{event.get('item_id')}' not found.", ErrorCode.ITEM_NOT_FOUND, "item_id", event.get("event_id"))
            return
        await self.send({"type": Server.ITEM_RETRIEVED, "item": item})

    async def _on_truncate(self, event: Event) -> None:
        eid, item_id = event.get("event_id"), event.get("item_id")
        item = self.items.get(item_id)
        meta = self._audio_meta.get(item_id)
        if item is None:
            await self._error(f"Item with item_id '{item_id}' not found.", ErrorCode.ITEM_NOT_FOUND, "item_id", eid)
            return
        if meta is None:
            await self._error("Only assistant messages with audio can be truncated.", ErrorCode.INVALID_VALUE, "item_id", eid)
            return
        end_ms = event.get("audio_end_ms")
        if not isinstance(end_ms, int) or end_ms < 0:
            await self._error("'audio_end_ms' must be a non-negative integer.", ErrorCode.INVALID_VALUE, "audio_end_ms", eid)
            return
        if end_ms > meta["audio_ms"]:
            await self._error(f"Audio content of {meta['audio_ms']}ms is already shorter than {end_ms}ms",
                              ErrorCode.INVALID_VALUE, "audio_end_ms", eid)
            return
        meta["audio_ms"] = end_ms
        heard = heard_transcript(meta["segments"], end_ms)
        for part in item["content"]:
            if part.get("type") == "output_audio":
                part["transcript"] = heard
        await self.send({"type": Server.ITEM_TRUNCATED, "item_id": item_id,
                         "content_index": event.get("content_index", 0), "audio_end_ms": end_ms})

    # -- responses ----------------------------------------------------------------------

    async def _on_response_create(self, event: Event) -> None:
        params = event.get("response") or {}
        if not isinstance(params, dict):
            await self._error("'response' must be an object.", ErrorCode.INVALID_VALUE, "response", event.get("event_id"))
            return
        await self.create_response(params, event.get("event_id"))

    async def _on_response_cancel(self, event: Event) -> None:
        rid = event.get("response_id")
        if self._response is None or self._response.done() or (rid and rid != self._response_id):
            await self._error("Cancellation failed: no active response found.", ErrorCode.CANCEL_NOT_ACTIVE,
                              None, event.get("event_id"))
            return
        await self._cancel_response("client_cancelled")

    async def _cancel_response(self, reason: str) -> None:
        task = self._response
        if task is None or task.done():
            return
        self._cancel_reason = reason
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def create_response(self, params: dict[str, Any], client_event_id: Optional[str] = None) -> None:
        if self._response is not None and not self._response.done():
            await self._error(f"Conversation already has an active response in progress: {self._response_id}. "
                              "Wait until the response is finished before creating a new one.",
                              ErrorCode.ACTIVE_RESPONSE, None, client_event_id)
            return
        self._response_id = events.new_id("resp")
        self._response = asyncio.get_running_loop().create_task(self._run_response(self._response_id, params))

    def _messages(self, params: dict[str, Any]) -> list[dict[str, str]]:
        items = list(self.items.values())
        if params.get("conversation") == "none":
            items = [i for i in params.get("input") or [] if isinstance(i, dict)]
        out: list[dict[str, Any]] = []
        for item in items:
            if item.get("type") == "function_call":  # in chat-completions' shape, for the model
                out.append({"role": "assistant", "content": None, "tool_calls": [{
                    "id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}]})
            elif item.get("type") == "function_call_output":
                out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output") or ""})
            elif item.get("type") == "message":
                text = " ".join(filter(None, (c.get("text") or c.get("transcript") for c in item.get("content") or [])))
                if text.strip():
                    out.append({"role": item.get("role", "user"), "content": text.strip()})
        return out

    async def _run_response(self, rid: str, params: dict[str, Any]) -> None:
        modalities = params.get("output_modalities") or self.config["output_modalities"]
        out_cfg = {**self.config["audio"]["output"], **((params.get("audio") or {}).get("output") or {})}
        audio_mode = "audio" in modalities
        response = {"id": rid, "object": "realtime.response", "status": "in_progress", "status_details": None,
                    "output": [], "conversation_id": None if params.get("conversation") == "none" else "conv_local",
                    "output_modalities": modalities, "max_output_tokens": params.get("max_output_tokens", "inf"),
                    "audio": {"output": {"format": out_cfg["format"], "voice": out_cfg["voice"]}},
                    "usage": None, "metadata": params.get("metadata")}
        await self.send({"type": Server.RESPONSE_CREATED, "response": copy.deepcopy(response)})
        out = _Output(self, response, audio_mode)
        status, details = "completed", None
        try:
            instructions = params.get("instructions", self.config["instructions"])
            tools = params.get("tools", self.config.get("tools")) or []
            choice = params.get("tool_choice", self.config.get("tool_choice", "auto"))
            async for said in sentences(self.responder.respond(instructions, self._messages(params), tools, choice)):
                if isinstance(said, ToolCall):
                    await out.close_message()
                    await out.function_call(said)
                    continue
                sentence = said
                message = await out.message()
                message.text += sentence
                message.part["transcript" if audio_mode else "text"] = message.text
                if not audio_mode:
                    await self.send({"type": Server.OUTPUT_TEXT_DELTA, **message.base, "delta": sentence})
                    continue
                await self.send({"type": Server.OUTPUT_TRANSCRIPT_DELTA, **message.base, "delta": sentence})
                meta = message.meta
                start = meta["audio_ms"]
                samples = 0
                pending = b""
                async for pcm in self.speaker.synthesize(sentence.strip(), out_cfg["voice"], float(out_cfg.get("speed", 1.0))):
                    self._voice_locked = True
                    pending += pcm
                    while len(pending) >= AUDIO_CHUNK_BYTES:
                        samples += await self._audio_delta(message.base, pending[:AUDIO_CHUNK_BYTES])
                        pending = pending[AUDIO_CHUNK_BYTES:]
                        meta["audio_ms"] = start + samples_to_ms(samples)
                if pending:
                    samples += await self._audio_delta(message.base, pending)
                meta["audio_ms"] = start + samples_to_ms(samples)
                meta["segments"].append((start, meta["audio_ms"], sentence))
        except asyncio.CancelledError:
            status, details = "cancelled", {"type": "cancelled", "reason": self._cancel_reason}
        except (ResponderError, TTSError) as exc:
            status, details = "failed", {"type": "failed", "error": {"type": "server_error", "code": "local_backend_error", "message": str(exc)}}
            await self._error(f"Response failed: {exc}", "local_backend_error")
        try:
            if not response["output"] or out.current is not None:
                await out.message()  # a response says something, if only an empty message
            await out.close_message(status)
            await self._finish_response(response, out.spoken, status, details)
        finally:
            self._cancel_reason = "client_cancelled"

    async def _audio_delta(self, base: dict[str, Any], pcm: bytes) -> int:
        await self.send({"type": Server.OUTPUT_AUDIO_DELTA, **base, "delta": base64.b64encode(pcm).decode("ascii")})
        return len(pcm) // 2

    async def _finish_response(self, response, text, status, details) -> None:
        out_tokens = max(1, len(text.split()))
        in_tokens = sum(len(str(m.get("content") or "").split()) for m in self._messages({}))
        response.update(status=status, status_details=details, usage={
            "total_tokens": in_tokens + out_tokens, "input_tokens": in_tokens, "output_tokens": out_tokens,
            "input_token_details": {"text_tokens": in_tokens, "audio_tokens": 0, "cached_tokens": 0},
            "output_token_details": {"text_tokens": out_tokens, "audio_tokens": 0}})
        await self.send({"type": Server.RESPONSE_DONE, "response": response})

    _handlers: dict[str, Callable[["LocalSession", Event], Awaitable[None]]] = {
        Client.SESSION_UPDATE: _on_session_update,
        Client.INPUT_AUDIO_APPEND: _on_append,
        Client.INPUT_AUDIO_COMMIT: _on_commit,
        Client.INPUT_AUDIO_CLEAR: _on_clear,
        Client.ITEM_CREATE: _on_item_create,
        Client.ITEM_DELETE: _on_item_delete,
        Client.ITEM_RETRIEVE: _on_item_retrieve,
        Client.ITEM_TRUNCATE: _on_truncate,
        Client.RESPONSE_CREATE: _on_response_create,
        Client.RESPONSE_CANCEL: _on_response_cancel,
    }


class _Message:
    def __init__(self, item: dict[str, Any], part: dict[str, Any], base: dict[str, Any], meta: dict[str, Any]) -> None:
        self.item, self.part, self.base, self.meta = item, part, base, meta
        self.text = ""


class _Output:
    """A response's output items, in order: assistant messages (opened when there is something
    to say) and function calls (a tool the model called)."""

    def __init__(self, session: "LocalSession", response: dict[str, Any], audio_mode: bool) -> None:
        self.s, self.response, self.audio_mode = session, response, audio_mode
        self.in_conversation = response["conversation_id"] is not None
        self.current: Optional[_Message] = None
        self.spoken = ""

    def _add(self, item: dict[str, Any]) -> tuple[int, Optional[str]]:
        index = len(self.response["output"])
        self.response["output"].append(item)
        previous = next(reversed(self.s.items), None)
        if self.in_conversation:
            self.s.items[item["id"]] = item
        return index, previous

    async def message(self) -> _Message:
        if self.current is not None:
            return self.current
        rid = self.response["id"]
        item = {"id": events.new_id("item"), "object": "realtime.item", "type": "message", "status": "in_progress",
                "role": "assistant", "content": []}
        index, previous = self._add(item)
        base = {"response_id": rid, "item_id": item["id"], "output_index": index, "content_index": 0}
        await self.s.send({"type": Server.OUTPUT_ITEM_ADDED, "response_id": rid, "output_index": index,
                           "item": copy.deepcopy(item)})
        if self.in_conversation:
            await self.s.send({"type": Server.ITEM_ADDED, "previous_item_id": previous, "item": copy.deepcopy(item)})
        part: dict[str, Any] = ({"type": "output_audio", "transcript": ""} if self.audio_mode
                                else {"type": "output_text", "text": ""})
        item["content"].append(part)
        await self.s.send({"type": Server.CONTENT_PART_ADDED, **base, "part": dict(part)})
        meta = {"audio_ms": 0, "segments": []}
        if self.audio_mode:
            self.s._audio_meta[item["id"]] = meta
        self.current = _Message(item, part, base, meta)
        return self.current

    async def close_message(self, status: str = "completed") -> None:
        m, self.current = self.current, None
        if m is None:
            return
        base, rid = m.base, self.response["id"]
        if self.audio_mode:
            await self.s.send({"type": Server.OUTPUT_AUDIO_DONE, **base})
            await self.s.send({"type": Server.OUTPUT_TRANSCRIPT_DONE, **base, "transcript": m.text})
        else:
            await self.s.send({"type": Server.OUTPUT_TEXT_DONE, **base, "text": m.text})
        await self.s.send({"type": Server.CONTENT_PART_DONE, **base, "part": dict(m.part)})
        m.item["status"] = "completed" if status == "completed" else "incomplete"
        await self.s.send({"type": Server.OUTPUT_ITEM_DONE, "response_id": rid, "output_index": base["output_index"],
                           "item": copy.deepcopy(m.item)})
        if self.in_conversation:
            await self.s.send({"type": Server.ITEM_DONE, "item": copy.deepcopy(m.item)})
        self.spoken += m.text

    async def function_call(self, call: ToolCall) -> None:
        rid = self.response["id"]
        item = {"id": events.new_id("item"), "object": "realtime.item", "type": "function_call",
                "status": "in_progress", "call_id": call.call_id, "name": call.name, "arguments": ""}
        index, previous = self._add(item)
        await self.s.send({"type": Server.OUTPUT_ITEM_ADDED, "response_id": rid, "output_index": index,
                           "item": copy.deepcopy(item)})
        if self.in_conversation:
            await self.s.send({"type": Server.ITEM_ADDED, "previous_item_id": previous, "item": copy.deepcopy(item)})
        base = {"response_id": rid, "item_id": item["id"], "output_index": index, "call_id": call.call_id}
        await self.s.send({"type": Server.FUNCTION_ARGS_DELTA, **base, "delta": call.arguments})
        await self.s.send({"type": Server.FUNCTION_ARGS_DONE, **base, "name": call.name, "arguments": call.arguments})
        item.update(status="completed", arguments=call.arguments)
        await self.s.send({"type": Server.OUTPUT_ITEM_DONE, "response_id": rid, "output_index": index,
                           "item": copy.deepcopy(item)})
        if self.in_conversation:
            await self.s.send({"type": Server.ITEM_DONE, "item": copy.deepcopy(item)})


async def sentences(chunks: AsyncIterator[Said]) -> AsyncIterator[Said]:
    """Re-chunk streamed text into sentences, so speech starts after the first one (a tool
    call passes straight through, after the text before it)."""
    pending = ""
    async for chunk in chunks:
        if isinstance(chunk, ToolCall):
            if pending.strip():
                yield pending
            pending = ""
            yield chunk
            continue
        pending += chunk
        while True:
            m = _SENTENCE_END.search(pending)
            if not m:
                break
            head, pending = pending[: m.end()], pending[m.end():]
            if head.strip():
                yield head
    if pending.strip():
        yield pending


def heard_transcript(segments: list[tuple[int, int, str]], end_ms: int) -> str:
    """The part of a spoken transcript heard before `end_ms` (words spread evenly in each sentence)."""
    out = ""
    for start, stop, text in segments:
        if end_ms >= stop:
            out += text
            continue
        if end_ms > start:
            words = text.split()
            n = int(len(words) * (end_ms - start) / max(1, stop - start))
            out += " ".join(words[:n])
        break
    return out.strip()
