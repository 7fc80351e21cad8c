"""A caller whose microphone hears its own loudspeaker, the way a phone on speaker does.

`EchoingMic` is an aiortc caller's source track: what it sends is the speech queued
with `play()`, plus the audio the caller received, played back `delay_ms` later
(measured on the microphone's own sample clock), attenuated by `gain_db`, through a
room (`room_rir()`: pyroomacoustics' image-source model of a small reverberant room),
plus background noise. `delay_ms` may drift (`drift_ms_per_s`) or jump (`jump()`),
as a phone's playout and capture buffers do. Pass `mic.hear` as the `Caller`'s
`on_frame` so every received frame comes back.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Optional

import numpy as np
from scipy.signal import fftconvolve

from media.audio import RTP_RATE

from .caller import FRAME_48K, PacedSource

_RING = RTP_RATE * 20  # 20 s of echo line


@lru_cache(maxsize=4)
def room_rir(rate: int = RTP_RATE, absorption: float = 0.35, seed: int = 3) -> np.ndarray:
    """The impulse response from a loudspeaker to a microphone 0.5 m away in a 4 × 3.5 × 2.7 m
    room (peak normalised to 1; direct sound first)."""
    import pyroomacoustics as pra

    np.random.seed(seed)
    room = pra.ShoeBox([4.0, 3.5, 2.7], fs=rate, materials=pra.Material(absorption), max_order=12)
    room.add_source([1.0, 1.0, 1.2])
    room.add_microphone([1.4, 1.2, 1.1])
    room.compute_rir()
    h = np.asarray(room.rir[0][0], dtype=np.float64)
    first = int(np.argmax(np.abs(h) > 0.05 * np.abs(h).max()))
    h = h[first:]  # the delay is delay_ms's to set, not the room's
    return (h / np.abs(h).max()).astype(np.float32)


class EchoingMic(PacedSource):
    def __init__(self, *, delay_ms: float = 150.0, gain_db: float = -6.0, rir: Optional[np.ndarray] = None,
                 noise_dbfs: Optional[float] = -60.0, drift_ms_per_s: float = 0.0, seed: int = 7) -> None:
        super().__init__()
        self.delay_ms = delay_ms
        self.gain = 10 ** (gain_db / 20)
        self.rir = rir
        self.drift_ms_per_s = drift_ms_per_s
        self.enabled = True
        self._noise = 10 ** (noise_dbfs / 20) * 32768 if noise_dbfs is not None else 0.0
        self._rng = np.random.default_rng(seed)
        self._line = np.zeros(_RING, dtype=np.float32)
        self._queued = bytearray()

    def play(self, pcm48: bytes) -> float:
        """Speech the caller says (48 kHz mono PCM16), after what is queued already; returns
        the monotonic time its first sample is captured (a frame is handed over when its last
        sample is captured, frame n at start + n x 20 ms)."""
        start = self._start if self._start is not None else time.monotonic()
        at = start + (self._n + len(self._queued) / 2 / FRAME_48K) * 0.02
        self._queued += pcm48
        return at

    def mute(self) -> None:
        """The loudspeaker goes off (what is already on its way through the room is dropped)."""
        self.enabled = False
        self._line[:] = 0.0

    def jump(self, ms: float) -> None:
        """The echo path's delay changes at once by `ms`."""
        self.delay_ms += ms

    def hear(self, frame, arrival: float) -> None:
        """A frame the caller received: it comes back through the room `delay_ms` later."""
        if not self.enabled:
            return
        x = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0].astype(np.float32)
        if frame.sample_rate != RTP_RATE:
            raise ValueError("the caller decodes at 48 kHz")
        y = fftconvolve(x, self.rir) if self.rir is not None else x
        y = y * self.gain
        delay = self.delay_ms + self.drift_ms_per_s * self._n * 0.02
        at = self._n * FRAME_48K + int(delay * RTP_RATE / 1000)
        idx = (at + np.arange(y.size)) % _RING
        self._line[idx] += y  # (the indices are distinct: y is far shorter than the line)

    def samples(self, n: int) -> np.ndarray:
        idx = (n * FRAME_48K + np.arange(FRAME_48K)) % _RING
        echo = self._line[idx].copy()
        self._line[idx] = 0.0
        out = echo
        if self._queued:
            chunk = bytes(self._queued[:FRAME_48K * 2]).ljust(FRAME_48K * 2, b"\0")
            del self._queued[:FRAME_48K * 2]
            out = out + np.frombuffer(chunk, dtype="<i2").astype(np.float32)
        if self._noise:
            out = out + self._rng.standard_normal(FRAME_48K).astype(np.float32) * self._noise
        return np.clip(out, -32768, 32767).astype("<i2")
