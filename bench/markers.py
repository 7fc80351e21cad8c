"""Audio markers for latency: a loud 20 ms 3 kHz burst over a quiet 440 Hz bed.

The bed (-30 dBFS) makes gaps measurable (concealed loss is exact silence); the
burst (-5 dBFS) makes onsets unambiguous. Sender and receiver note the monotonic
time of each burst; processes on one machine share that clock.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from typing import Optional

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

BED_LEVEL = 0.03
BURST_LEVEL = 0.6
BURST_HZ = 3000
BED_HZ = 440
ONSET = 0.3  # |x| above this (of full scale) is a burst
QUIET = 0.005  # |x| below this for a whole run is a gap
PERIOD_FRAMES = 25  # a marker every 500 ms


def marker_frame(rate: int, n: int, burst: bool, phase: int) -> np.ndarray:
    t = (np.arange(n) + phase) / rate
    x = BED_LEVEL * np.sin(2 * np.pi * BED_HZ * t)
    if burst:
        x = x + BURST_LEVEL * np.sin(2 * np.pi * BURST_HZ * t)
    return (x * 32767).astype("<i2")


class MarkerSource(MediaStreamTrack):
    """48 kHz mono, paced: the bed with a burst every PERIOD_FRAMES; notes when each burst is handed out."""

    kind = "audio"

    def __init__(self, period: int = PERIOD_FRAMES, offset: int = 10) -> None:
        super().__init__()
        self.period, self.offset = period, offset
        self.sent: list[float] = []
        self._n = 0
        self._start: Optional[float] = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            wait = self._start + self._n * 0.02 - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        burst = self._n % self.period == self.offset
        frame = av.AudioFrame.from_ndarray(marker_frame(48000, 960, burst, self._n * 960).reshape(1, -1),
                                           format="s16", layout="mono")
        frame.sample_rate = 48000
        frame.time_base = fractions.Fraction(1, 48000)
        frame.pts = self._n * 960
        self._n += 1
        if burst:
            self.sent.append(time.monotonic())  # handed to the encoder now
        return frame


class OnsetDetector:
    """Feed PCM blocks with arrival times; collects burst onsets and silent gaps."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.onsets: list[float] = []
        self.gaps_ms: list[float] = []
        self._loud = False
        self._quiet_run = 0
        self.samples = 0

    def feed(self, pcm: np.ndarray, arrival: float, missing_samples: int = 0) -> None:
        x = np.abs(pcm.astype(np.float32)) / 32768
        if missing_samples:
            self._quiet_run += missing_samples
        loud = bool(x.size) and float(x.max()) > ONSET
        if loud and not self._loud:
            self.onsets.append(arrival)
        self._loud = loud
        # silence runs, sample-accurate at the block's edges
        q = x < QUIET
        if q.all():
            self._quiet_run += x.size
        else:
            first_loud = int(np.argmin(q))
            self._close_gap(self._quiet_run + first_loud)
            last_loud = x.size - 1 - int(np.argmin(q[::-1]))
            self._quiet_run = x.size - 1 - last_loud
        self.samples += x.size

    def _close_gap(self, run: int) -> None:
        ms = run * 1000 / self.rate
        if ms >= 60:
            self.gaps_ms.append(ms)

    def finish(self) -> None:
        self._close_gap(self._quiet_run)
        self._quiet_run = 0


def pair(sent: list[float], seen: list[float], window: float = 0.45) -> tuple[list[float], int]:
    """Latencies (ms) of markers matched to the first onset within `window` after each; and how many were lost."""
    latencies, lost, j = [], 0, 0
    for s in sent:
        while j < len(seen) and seen[j] < s:
            j += 1
        if j < len(seen) and seen[j] - s < window:
            latencies.append((seen[j] - s) * 1000)
            j += 1
        else:
            lost += 1
    return latencies, lost
