"""Audio markers for latency: a loud 20 ms burst over a quiet 440 Hz bed.

The bed (-30 dBFS) makes gaps measurable (concealed loss is exact silence); the
burst (-5 dBFS) makes onsets unambiguous. Each burst carries a code (its
frequency: one of 8, by index), so a lost marker can never be mistaken for the
next one. Sender and receiver note the monotonic time of each burst; processes
on one machine share that clock.
"""

from __future__ import annotations

import fractions
import time

import av
import numpy as np

from harness.caller import PacedSource

BED_LEVEL = 0.03
BURST_LEVEL = 0.6
BURST_BASE_HZ = 1000
BURST_STEP_HZ = 500
CODES = 8  # codes repeat every 8 markers (4 s)
BED_HZ = 440
ONSET = 0.3  # |x| above this (of full scale) is a burst
QUIET = 0.005  # |x| below this for a whole run is a gap
PERIOD_FRAMES = 25  # a marker every 500 ms


def marker_frame(rate: int, n: int, burst: bool, phase: int, code: int = 0) -> np.ndarray:
    t = (np.arange(n) + phase) / rate
    x = BED_LEVEL * np.sin(2 * np.pi * BED_HZ * t)
    if burst:
        x = x + BURST_LEVEL * np.sin(2 * np.pi * (BURST_BASE_HZ + BURST_STEP_HZ * (code % CODES)) * t)
    return (x * 32767).astype("<i2")


def decode(x: np.ndarray, rate: int) -> int:
    """The code of a burst from its strongest frequency above the bed."""
    spectrum = np.abs(np.fft.rfft(x.astype(np.float32) * np.hanning(x.size)))
    freqs = np.fft.rfftfreq(x.size, 1 / rate)
    spectrum[freqs < 700] = 0
    f = freqs[int(np.argmax(spectrum))]
    return int(round((f - BURST_BASE_HZ) / BURST_STEP_HZ)) % CODES


class MarkerSource(PacedSource):
    """The bed with a burst every `period` frames; notes when each burst is handed to the encoder."""

    def __init__(self, period: int = PERIOD_FRAMES, offset: int = 10) -> None:
        super().__init__()
        self.period, self.offset = period, offset
        self.sent: list[tuple[float, int]] = []  # (monotonic, code)

    def samples(self, n: int) -> np.ndarray:
        burst = n % self.period == self.offset
        code = len(self.sent) % CODES
        if burst:
            self.sent.append((time.monotonic(), code))  # recv() returns this frame to the encoder now
        return marker_frame(48000, 960, burst, n * 960, code)


class PreEncodedSource(PacedSource):
    """A cheap caller for load: one second of the bed encoded to Opus once, then looped
    as packets (aiortc sends av.Packet without encoding), paced at 20 ms."""

    _packets: list[bytes] = []

    def __init__(self) -> None:
        super().__init__()
        if not PreEncodedSource._packets:
            PreEncodedSource._packets = _encode_bed()

    async def recv(self) -> av.Packet:
        await self.wait_for_slot()
        packet = av.Packet(self._packets[self._n % len(self._packets)])
        packet.pts = self._n * 960
        packet.time_base = fractions.Fraction(1, 48000)
        self._n += 1
        return packet


def _encode_bed() -> list[bytes]:
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate, codec.layout, codec.format, codec.bit_rate = 48000, "stereo", "s16", 32000
    codec.time_base = fractions.Fraction(1, 48000)
    out = []
    for n in range(50):
        mono = marker_frame(48000, 960, False, n * 960)
        frame = av.AudioFrame.from_ndarray(np.repeat(mono, 2).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = 48000, n * 960, fractions.Fraction(1, 48000)
        out += [bytes(p) for p in codec.encode(frame)]
    return out


class OnsetDetector:
    """Feed PCM blocks with arrival times; collects burst onsets and silent gaps."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.onsets: list[tuple[float, int]] = []  # (arrival, code)
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
            self.onsets.append((arrival, decode(pcm, self.rate)))
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


def pair(sent: list[tuple[float, int]], seen: list[tuple[float, int]], window: float = 3.5) -> tuple[list[float], int]:
    """Latencies (ms) of sent markers matched to the first unused onset with the same code
    within `window` s after each (codes repeat every 4 s); and how many were lost."""
    latencies, lost = [], 0
    used = [False] * len(seen)
    start = 0
    for t, code in sent:
        while start < len(seen) and seen[start][0] < t:
            start += 1
        match = None
        for j in range(start, len(seen)):
            at, c = seen[j]
            if at - t >= window:
                break
            if not used[j] and c == code:
                match = j
                break
        if match is None:
            lost += 1
        else:
            used[match] = True
            latencies.append((seen[match][0] - t) * 1000)
    return latencies, lost
