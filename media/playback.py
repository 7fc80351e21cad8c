"""The outbound track: model audio deltas in, one paced 20 ms frame per `recv()` out.

aiortc's sender does not pace: it calls `recv()` in a loop and encodes whatever
comes back. So this track owns the clock. Each frame is due at
`start + n * 20 ms` on the monotonic clock; `pts` is `n * 480`, continuous for
the life of the track, through silence and flushes alike (RTP timestamps come
from pts, and a jump in them is heard as a glitch). When nothing is buffered the
track plays silence, so RTP never stops.

What a frame is depends on the encoder behind the track. With the call's own
libopus packer (`media/downlink.py`, the default) it is the 24 kHz mono PCM
itself, in a `PcmFrame`: no resampling at all. With aiortc's stock encoder it is
48 kHz stereo: fed 24 kHz mono, that encoder resamples and upmixes itself, and
the upmix costs 3 dB (mono → stereo at -3 dB per channel) and its fixed-size
resampler holds every frame back by one (+20 ms); upsampling here, with one
resampler per track primed once, avoids both.

For barge-in the track counts, per assistant item, the samples it received and
the samples it actually handed to the encoder; `flush()` returns those counts so
the truncation point is what was really played, never a wall-clock guess.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .audio import FRAME_BYTES, FRAME_MS, REALTIME_RATE, RTP_RATE, samples_to_ms
from .downlink import PcmFrame
from .resample import StreamResampler

logger = logging.getLogger(__name__)

FRAME_S = FRAME_MS / 1000
#: If a frame is this late (event loop stalled), re-anchor the clock instead of
#: bursting the backlog out: bursts overflow the browser's jitter buffer.
REANCHOR_AFTER_S = 0.1
#: Hard cap on buffered model audio (a runaway upstream must not eat memory).
MAX_BUFFERED_SAMPLES = REALTIME_RATE * 600
_TIME_BASE = fractions.Fraction(1, RTP_RATE)
_SILENCE = bytes(FRAME_BYTES)
#: Samples per channel of one outbound frame at the RTP rate (960).
OUT_FRAME_SAMPLES = RTP_RATE * FRAME_MS // 1000


def pcm_frame(pcm: bytes, pts: int) -> PcmFrame:
    """For the call's own Opus packer: the PCM as it is."""
    return PcmFrame(pcm, pts, _TIME_BASE)


class Upsampler:
    """For aiortc's encoder: 24 kHz mono PCM16 → exactly one 20 ms frame of 48 kHz stereo
    s16 per call."""

    def __init__(self) -> None:
        self._resampler = StreamResampler(RTP_RATE, "mono")
        self._fifo = np.zeros(0, dtype="<i2")

    def __call__(self, pcm: bytes, pts: int) -> av.AudioFrame:
        fifo = np.concatenate([self._fifo, self._resampler.pcm(pcm, REALTIME_RATE)])
        if fifo.size < OUT_FRAME_SAMPLES:
            # Only at the start: the filter holds back a few samples. Prime with
            # silence once so every later call has a whole frame ready.
            fifo = np.concatenate([np.zeros(OUT_FRAME_SAMPLES - fifo.size, dtype="<i2"), fifo])
        mono, self._fifo = fifo[:OUT_FRAME_SAMPLES], fifo[OUT_FRAME_SAMPLES:]
        frame = av.AudioFrame.from_ndarray(np.repeat(mono, 2).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate = RTP_RATE
        frame.time_base = _TIME_BASE
        frame.pts = pts
        return frame


@dataclass
class ItemPlayout:
    """What happened to one assistant item's audio on its way to the encoder."""

    item_id: str
    received_samples: int = 0
    played_samples: int = 0

    @property
    def played_ms(self) -> int:
        return samples_to_ms(self.played_samples)

    @property
    def audio_end_ms(self) -> int:
        """The truncation point: what was played, never more than was received."""
        return samples_to_ms(min(self.played_samples, self.received_samples))


@dataclass
class PlaybackStats:
    frames: int = 0
    audio_frames: int = 0
    late_frames: int = 0  # frames handed out after their due time
    max_lateness_ms: float = 0.0
    reanchors: int = 0
    dropped_samples: int = 0  # over MAX_BUFFERED_SAMPLES
    #: (monotonic time, ms late; 0 when on time) of the recent frames
    lateness_ms: deque = field(default_factory=lambda: deque(maxlen=3000))


class PlaybackTrack(MediaStreamTrack):
    """Outbound audio track fed with 24 kHz PCM16 mono chunks tagged by item id."""

    kind = "audio"

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        frames: Optional[Callable[[bytes, int], Any]] = None,
    ) -> None:
        """`frames(pcm, pts)` makes what `recv()` returns: `pcm_frame` for the call's own
        packer, an `Upsampler()` (the default) for aiortc's encoder."""
        super().__init__()
        self._clock = clock
        self._sleep = sleep
        self._segments: deque[list] = deque()  # [item_id, bytes, offset]
        self._buffered = 0  # samples
        self._items: dict[str, ItemPlayout] = {}
        self._start: Optional[float] = None
        self._frames = 0
        self._playing: Optional[str] = None  # item id of the audio being played
        self._audio_done = False
        self.paused = False  # silence out, nothing consumed (the caller cannot hear: its network is gone)
        self._make_frame = frames or Upsampler()
        self.stats = PlaybackStats()
        #: Called with the item id when its first samples go to the encoder.
        self.on_started: Optional[Callable[[str], None]] = None
        #: Called with the last item id when the buffer runs dry after `end_of_audio()`.
        self.on_stopped: Optional[Callable[[str], None]] = None
        #: Each called with every 20 ms frame's PCM as it goes to the encoder (a recording's
        #: model side, the echo guard's reference).
        self.pcm_taps: list[Callable[[bytes], None]] = []

    def set_frames(self, frames: Callable[[bytes, int], Any]) -> None:
        """Change what `recv()` returns (before the sender starts)."""
        self._make_frame = frames

    # -- feeding ---------------------------------------------------------------

    def enqueue(self, item_id: str, pcm: bytes) -> None:
        """Queue model audio for `item_id` (24 kHz PCM16 mono)."""
        if len(pcm) % 2:
            pcm = pcm[:-1]
        samples = len(pcm) // 2
        if not samples:
            return
        if self._buffered + samples > MAX_BUFFERED_SAMPLES:
            self.stats.dropped_samples += samples
            logger.warning("PlaybackTrack(%s) buffer full, dropping %d samples", self.id, samples)
            return
        self._item(item_id).received_samples += samples
        self._segments.append([item_id, pcm, 0])
        self._buffered += samples
        self._audio_done = False

    def end_of_audio(self) -> None:
        """No more audio is coming for now: `on_stopped` fires once the buffer drains."""
        self._audio_done = True
        if not self._buffered:
            self._finish_playing()

    def flush(self) -> list[ItemPlayout]:
        """Drop everything not yet played. Returns the cut items (played < received).

        pts is untouched: the next frame continues the timeline with silence.
        """
        # the item playing is cut too when nothing of it is buffered (its audio arriving in real
        # time): whatever comes for it later is not to be heard
        cut_ids = dict.fromkeys([*([self._playing] if self._playing in self._items else []),
                                 *(seg[0] for seg in self._segments)])
        self._segments.clear()
        self._buffered = 0
        self._playing = None
        self._audio_done = False
        return [self._items[i] for i in cut_ids]

    def playout(self, item_id: str) -> Optional[ItemPlayout]:
        return self._items.get(item_id)

    def forget(self, item_id: str) -> None:
        """Drop the accounting of an item nobody will truncate any more."""
        self._items.pop(item_id, None)

    @property
    def buffered_ms(self) -> int:
        return samples_to_ms(self._buffered)

    @property
    def playing_item(self) -> Optional[str]:
        return self._playing

    # -- the encoder side ------------------------------------------------------

    async def recv(self) -> Any:
        if self.readyState != "live":
            raise MediaStreamError
        await self._wait_for_slot()
        pcm = self._next_pcm()
        for tap in self.pcm_taps:
            tap(pcm)  # what goes on the wire
        frame = self._make_frame(pcm, self._frames * OUT_FRAME_SAMPLES)
        self._frames += 1
        self.stats.frames += 1
        return frame

    async def _wait_for_slot(self) -> None:
        now = self._clock()
        if self._start is None:
            self._start = now
            return
        due = self._start + self._frames * FRAME_S
        wait = due - now
        if wait > 0:
            self.stats.lateness_ms.append((now, 0.0))  # on time: percentiles are over every frame
            await self._sleep(wait)
            return
        late = -wait
        self.stats.lateness_ms.append((now, late * 1000))
        if late > 0.001:
            self.stats.late_frames += 1
            self.stats.max_lateness_ms = max(self.stats.max_lateness_ms, late * 1000)
        if late > REANCHOR_AFTER_S:
            # Deliberate re-anchor: continue from now rather than burst the backlog.
            self._start = now - self._frames * FRAME_S
            self.stats.reanchors += 1
            logger.debug("PlaybackTrack(%s) re-anchored after %.0f ms stall", self.id, late * 1000)

    def _next_pcm(self) -> bytes:
        if self.paused:
            return _SILENCE
        if not self._buffered:
            if self._playing is not None and self._audio_done:
                self._finish_playing()
            return _SILENCE
        out = bytearray()
        while len(out) < FRAME_BYTES and self._segments:
            seg = self._segments[0]
            item_id, data, offset = seg
            take = min(FRAME_BYTES - len(out), len(data) - offset)
            out += data[offset : offset + take]
            seg[2] = offset + take
            playout = self._items[item_id]
            playout.played_samples += take // 2
            self._buffered -= take // 2
            if self._playing != item_id:
                self._playing = item_id
                if self.on_started:
                    self.on_started(item_id)
            if seg[2] >= len(data):
                self._segments.popleft()
        self.stats.audio_frames += 1
        if len(out) < FRAME_BYTES:
            out += bytes(FRAME_BYTES - len(out))
        if not self._buffered and self._audio_done:
            self._finish_playing()
        return bytes(out)

    def _finish_playing(self) -> None:
        item_id, self._playing = self._playing, None
        self._audio_done = False
        if item_id is not None and self.on_stopped:
            self.on_stopped(item_id)

    def _item(self, item_id: str) -> ItemPlayout:
        playout = self._items.get(item_id)
        if playout is None:
            playout = self._items[item_id] = ItemPlayout(item_id)
        return playout
