"""A Realtime endpoint that answers instantly, for benchmarks: the bridge's cost alone.

Per session it timestamps every `input_audio_buffer.append` and finds marker
onsets and gaps in the 24 kHz PCM; and it sends audio deltas itself:
  mode "markers":    paced real-time deltas of the bed with a burst every 500 ms
                     (plus 60 ms sent ahead, as models run ahead of real time):
                     continuous audio, for gaps and load
  mode "first-audio": only a 20 ms burst every 500 ms, so each lands on an empty
                     playback buffer: the latency of a reply's first audio
  mode "echo":       every append straight back as a delta (round trips)
  mode "quiet":      nothing
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from websockets.asyncio.server import serve

from realtime.events import Client, Server
from bench.markers import CODES, PERIOD_FRAMES, OnsetDetector, marker_frame


@dataclass
class UpSession:
    detector: OnsetDetector = field(default_factory=lambda: OnsetDetector(24000))
    sent_markers: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, code)
    arrivals: list[float] = field(default_factory=list)  # monotonic time of every append
    appends: int = 0
    task: Optional[asyncio.Task] = None
    pcm: Optional[bytearray] = None  # every appended byte, when the upstream keeps audio


class InstantUpstream:
    def __init__(self, mode: str = "markers", keep_audio: bool = False, host: str = "127.0.0.1") -> None:
        self.host = host
        self.mode = mode
        self.keep_audio = keep_audio
        self.sessions: list[UpSession] = []
        self._server = None
        self.url = ""

    async def start(self) -> "InstantUpstream":
        self._server = await serve(self._handler, self.host, 0, max_size=None, compression=None)
        self.url = f"ws://{self.host}:{self._server.sockets[0].getsockname()[1]}/v1/realtime"
        return self

    async def stop(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _handler(self, ws) -> None:
        s = UpSession(pcm=bytearray() if self.keep_audio else None)
        self.sessions.append(s)
        await ws.send(json.dumps({"type": Server.SESSION_CREATED, "session": {"type": "realtime"}}))
        if self.mode in ("markers", "first-audio"):
            s.task = asyncio.ensure_future(self._play(ws, s, continuous=self.mode == "markers"))
        try:
            async for message in ws:
                now = time.monotonic()
                event = json.loads(message)
                kind = event.get("type")
                if kind == Client.INPUT_AUDIO_APPEND:
                    pcm = base64.b64decode(event["audio"])
                    s.appends += 1
                    if s.pcm is not None:
                        s.pcm += pcm
                    s.arrivals.append(now)
                    s.detector.feed(np.frombuffer(pcm, dtype="<i2"), now)
                    if self.mode == "echo":
                        await ws.send(json.dumps({"type": Server.OUTPUT_AUDIO_DELTA, "response_id": "resp_echo",
                                                  "item_id": "item_echo", "output_index": 0, "content_index": 0,
                                                  "delta": event["audio"]}))
                elif kind == Client.SESSION_UPDATE:
                    await ws.send(json.dumps({"type": Server.SESSION_UPDATED, "session": event.get("session", {})}))
        except Exception:
            pass
        finally:
            if s.task:
                s.task.cancel()
            s.detector.finish()

    async def _play(self, ws, s: UpSession, continuous: bool) -> None:
        """Model audio at real time (after a 60 ms head start), a marker every 500 ms."""
        n, lead = 0, 3 if continuous else 0
        start = time.monotonic()
        while True:
            burst = n % PERIOD_FRAMES == 5
            if not (burst or continuous):
                n += 1
                await asyncio.sleep(max(0.0, start + (n - lead) * 0.02 - time.monotonic()))
                continue
            code = len(s.sent_markers) % CODES
            pcm = marker_frame(24000, 480, burst, n * 480, code).tobytes()
            await ws.send(json.dumps({"type": Server.OUTPUT_AUDIO_DELTA, "response_id": "resp_bench",
                                      "item_id": "item_bench", "output_index": 0, "content_index": 0,
                                      "delta": base64.b64encode(pcm).decode()}))
            if burst:
                s.sent_markers.append((time.monotonic(), code))
            n += 1
            wait = start + (n - lead) * 0.02 - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
