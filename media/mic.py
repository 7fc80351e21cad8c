"""The inbound side: the browser's decoded Opus frames in, 24 kHz PCM16 mono chunks out.

aiortc decodes Opus to 48 kHz stereo s16 frames and puts them in an unbounded
queue; a call that stops reading grows memory without limit, and a packet that
lands before the first read leaves a hole that delays the whole call (see
PEERS.md). So the pump starts reading the moment the track exists and never
stops until the call ends.

aiortc passes pts gaps (lost packets) straight through. The pump counts them and
fills them with silence so the upstream timeline (VAD timestamps, truncation)
stays aligned with the caller's clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .audio import REALTIME_RATE
from .resample import StreamResampler

logger = logging.getLogger(__name__)

#: Longest gap filled with silence; a longer hole is a pause, not loss.
MAX_CONCEAL_S = 1.0


class MicTimeout(Exception):
    """No audio arrived from the caller for longer than the media timeout."""


@dataclass
class MicStats:
    frames: int = 0
    samples_out: int = 0
    lost_frames: int = 0
    concealed_ms: float = 0.0


class MicPump:
    """Reads a remote audio track for the life of a call and hands PCM chunks to `sink`."""

    def __init__(
        self,
        track: MediaStreamTrack,
        sink: Callable[[bytes], Awaitable[None]],
        *,
        timeout_s: float = 0.0,
    ) -> None:
        self._track = track
        self._sink = sink
        self._timeout_s = timeout_s
        self._resampler = StreamResampler(REALTIME_RATE, "mono")  # one per call: it is stateful
        self._next_pts: Optional[int] = None
        self.stats = MicStats()
        self.last_frame_at: Optional[float] = None  # monotonic: when the caller's audio last came

    async def run(self) -> None:
        """Pump until the track ends. Raises MicTimeout if the caller goes silent on RTP for
        `timeout_s` (0: never; the call then watches `last_frame_at` itself, to hold it)."""
        while True:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
                # lands as a frame arrives, and the call's teardown then hangs on this task.
                async with asyncio.timeout(self._timeout_s or None):
                    frame = await self._track.recv()
            except MediaStreamError:
                return
            except asyncio.TimeoutError:
                raise MicTimeout(f"no audio from the caller for {self._timeout_s:g} s") from None
            self.last_frame_at = time.monotonic()
            concealed = self._conceal_gap(frame)  # reads pts, which the resampler then overwrites
            pcm = concealed + self._resampler.frame(frame).tobytes()
            self.stats.frames += 1
            self.stats.samples_out += len(pcm) // 2
            await self._sink(pcm)

    def _conceal_gap(self, frame: av.AudioFrame) -> bytes:
        pts, rate, samples = frame.pts, frame.sample_rate, frame.samples
        if pts is None:
            return b""
        gap = pts - self._next_pts if self._next_pts is not None else 0
        if pts >= (self._next_pts or 0):
            self._next_pts = pts + samples
        if gap <= 0 or samples <= 0:
            return b""
        self.stats.lost_frames += max(1, round(gap / samples))
        gap_s = gap / rate
        if gap_s > MAX_CONCEAL_S:
            return b""
        self.stats.concealed_ms += gap_s * 1000
        return bytes(int(gap_s * REALTIME_RATE) * 2)
