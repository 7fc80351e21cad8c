"""Echo guard: the model's own voice taken out of the caller's audio, on the server.

A phone on speaker, a car kit or a browser that ignores `echoCancellation` sends
back what it plays: the model then hears itself, its VAD calls that speech, and
it interrupts or answers itself. The bridge knows exactly what it played: every
downlink frame passes through `PlaybackTrack` on its way to the encoder. That
PCM is the reference of an acoustic echo canceller run on the uplink, before the
audio reaches the model (and so before any VAD decides the caller is speaking).

The engine is WebRTC's AEC3 (the canceller inside Chrome), through the
`pywebrtc-audio` wheel, which ships the library: it estimates the echo path's
delay itself (tested here from 80 to 400 ms; it finds nothing past ~500 ms),
follows a drifting delay, and its suppressor handles double talk. It costs about
0.013 core per call on this machine while it runs, so it runs only while echo
can be present: from the first voiced reference sample until `TAIL_S` after the
last one. Outside those stretches the caller's audio passes untouched.

Alignment: the uplink and downlink run on different clocks (the phone's capture,
our pacer) and the uplink arrives in bursts. The reference fed to the canceller
is read with its own cursor, advanced by exactly as many samples as the uplink
brought, so the canceller sees a steady delay; the cursor is put back `LEAD_S`
behind the newest reference only when it drifts out of bounds (an uplink outage,
a burst longer than the reorder wait). The canceller then sees the echo path's
delay minus `LEAD_S`.

Modes (`ECHO_GUARD`):

- `on`: the canceller's output goes to the model whenever it runs;
- `auto` (default): the same until the call shows it has no echo: after
  `CLEAR_WINDOWS` seconds of model speech in which the caller showed no echo
  (audible without the model's envelope in it, or quiet while the model was loud), the caller's audio
  passes untouched (the canceller keeps listening, at the same cost, and takes
  over again the moment echo shows). Echo is "detected" when the caller's level
  follows the model's at some delay (`echo_similarity`); that is logged once per
  call and counted in the call's record and `/metrics`.
- `off`: nothing runs.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .audio import REALTIME_RATE, rms_dbfs

logger = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
#: The canceller works in 10 ms blocks; uplink audio is handed over in whole blocks.
BLOCK = REALTIME_RATE // 100
#: Reference kept for reading (more than the longest delay the canceller can find).
RING_S = 2.0
#: The cursor sits this far behind the newest reference: room for uplink bursts.
LEAD_S = 0.02
#: ...and is put back there when it drifts this much beyond it.
RESYNC_S = 0.15
#: Echo may come back until this long after the last voiced reference sample (the
#: longest delay the canceller finds plus a room's reverberation).
TAIL_S = 0.8
#: A reference frame quieter than this carries nothing worth cancelling.
VOICED_DBFS = -60.0
#: A caller's window quieter than this says nothing about echo (digital silence, or a
#: browser's own canceller already took it all).
FLOOR_DBFS = -55.0
#: ...unless the model was this loud meanwhile: then its echo would have been above the floor.
AUDIBLE_MODEL_DBFS = -40.0
#: Envelope correlation that says echo, and below which a window says no echo.
#: (Echo alone correlates at 0.86-0.98 at one steady delay; a caller talking over the
#: model without any echo reached 0.61 at wandering delays, in bench/echo_guard.py's speech.)
DETECT_SIMILARITY = 0.8
CLEAR_SIMILARITY = 0.65
CLEAR_WINDOWS = 3
WINDOW_S = 1.0
#: Envelopes judged: the last 3 s, at delays up to 0.6 s.
ENVELOPE_S = 3.0
MAX_DELAY_BLOCKS = int(0.6 * 100)
MIN_OVERLAP_BLOCKS = 100
#: A call's first second of cancelling, while AEC3 is still finding the echo path (a real
#: browser's loop, Firefox through PulseAudio here, set off the local backend's VAD 0.6 s into
#: the model's first words): a block quieter than the model's loudest of the last 0.6 s is
#: turned down this much; a caller louder than that (talking over the model) passes.
CAUTIOUS_MS = 1000
CAUTIOUS_GAIN = 0.1
_VOICED_RMS = 32768 * 10 ** (VOICED_DBFS / 20)


def _energy(x: np.ndarray) -> float:
    return float(np.dot(x, x)) if x.size else 0.0


def _dbfs(energy: float, n: int) -> float:
    return 10 * math.log10(max(energy / max(n, 1), 1e-3) / 32768.0 ** 2)


@dataclass
class EchoStats:
    mode: str = "auto"
    state: str = "listening"  # listening (no verdict yet), echo, clear
    detected: bool = False
    detected_after_s: Optional[float] = None  # seconds of model speech until echo was found
    cleared_after_s: Optional[float] = None  # ... until the call showed it has none
    erle_db: list = field(default_factory=list)  # echo removed per window where echo was found
    cancelled_ms: int = 0  # uplink audio that went to the model through the canceller
    processed_ms: int = 0  # uplink audio the canceller ran on
    resyncs: int = 0
    cpu_s: float = 0.0

    def as_dict(self) -> dict:
        erle = sorted(self.erle_db)
        return {"mode": self.mode, "state": self.state, "detected": int(self.detected),
                "detected_after_s": self.detected_after_s, "cleared_after_s": self.cleared_after_s,
                "erle_db_p50": round(erle[len(erle) // 2], 1) if erle else None,
                "cancelled_ms": self.cancelled_ms, "processed_ms": self.processed_ms,
                "resyncs": self.resyncs, "cpu_ms": round(self.cpu_s * 1000, 1)}


_latency: Optional[int] = None


def aec_latency() -> int:
    """Samples the canceller's output lags its input (224 at 24 kHz: AEC3's band split and
    the resampling to its internal rate), measured once with a burst of noise."""
    global _latency
    if _latency is None:
        from pywebrtc_audio import AudioProcessor

        ap = AudioProcessor(sample_rate=REALTIME_RATE, echo_cancellation=True)
        burst = np.zeros(REALTIME_RATE // 2, dtype=np.int16)
        burst[REALTIME_RATE // 5:REALTIME_RATE // 5 + 2400] = \
            (np.random.default_rng(0).standard_normal(2400) * 3000).astype(np.int16)
        silent = np.zeros_like(burst)
        out = np.concatenate([ap.process(burst[i:i + 480], silent[i:i + 480]) for i in range(0, burst.size, 480)])
        corr = np.correlate(out.astype(np.float32), burst.astype(np.float32), "full")
        _latency = max(0, int(np.argmax(corr)) - (burst.size - 1))
    return _latency


class EchoGuard:
    """One call's canceller. `reference(pcm)` with every downlink frame as it goes to the
    encoder; `process(pcm)` with the caller's audio, in order: returns what the model gets
    (24 kHz PCM16 mono both ways; the output may hold back a partial 10 ms block)."""

    def __init__(self, mode: str = "auto", *, call_id: str = "-") -> None:
        if mode not in MODES:
            raise ValueError(f"ECHO_GUARD must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.call_id = call_id
        self.stats = EchoStats(mode=mode)
        self._ring = np.zeros(int(RING_S * REALTIME_RATE), dtype=np.int16)
        self._written = 0  # reference samples ever written
        self._voiced_end = -1  # sample index just past the last voiced reference frame
        self._cursor: Optional[int] = None
        self._pending = np.zeros(0, dtype=np.int16)  # caller samples short of a whole block
        self._aec = None
        self._ran = False  # the canceller ran on the previous caller audio
        self._delayed = False  # what the model gets runs the canceller's delay behind the caller
        self._tail = np.zeros(0, dtype=np.int16)  # the caller's last samples, that many
        self._env_near: deque = deque(maxlen=int(ENVELOPE_S * 100))
        self._env_far: deque = deque(maxlen=int(ENVELOPE_S * 100))
        self._window_in = self._window_out = self._window_far = 0.0
        self._window_n = 0
        self._quiet_windows = 0
        self._speech_s = 0.0  # model speech the canceller has listened through

    # -- the downlink ---------------------------------------------------------------

    def reference(self, pcm: bytes) -> None:
        if self.mode == "off":
            return
        x = np.frombuffer(pcm, dtype="<i2")
        n = x.size
        start = self._written % self._ring.size
        first = min(n, self._ring.size - start)
        self._ring[start:start + first] = x[:first]
        self._ring[:n - first] = x[first:]
        self._written += n
        if rms_dbfs(pcm) > VOICED_DBFS:
            self._voiced_end = self._written

    # -- the uplink -----------------------------------------------------------------

    def process(self, pcm: bytes) -> bytes:
        if self.mode == "off" or (self._voiced_end < 0 and not self._pending.size):
            return pcm  # the model has not spoken yet: nothing to cancel
        near = np.frombuffer(pcm, dtype="<i2")
        if self._pending.size:
            near = np.concatenate([self._pending, near])
        whole = near.size - near.size % BLOCK
        self._pending = near[whole:].copy()
        near = near[:whole]
        if not whole:
            return b""
        cursor = self._align(whole)
        self._cursor = cursor + whole
        tail = self._tail
        self._tail = np.concatenate([tail, near])[-tail.size:] if tail.size else tail
        if self._voiced_end <= cursor - int(TAIL_S * REALTIME_RATE):
            self._ran = False
            return self._raw(near, tail)  # no echo can be in it
        far = self._read(cursor, whole)
        if self._aec is None:
            from pywebrtc_audio import AudioProcessor

            self._aec = AudioProcessor(sample_rate=REALTIME_RATE, echo_cancellation=True)
            self._tail = np.zeros(aec_latency(), dtype=np.int16)  # the canceller's own delay
            self._tail[-min(near.size, self._tail.size):] = near[-self._tail.size:]
        started = time.process_time()
        out = self._aec.process(near, far)
        self.stats.cpu_s += time.process_time() - started
        ms = whole * 1000 // REALTIME_RATE
        self.stats.processed_ms += ms
        self._judge(near, far, out)
        resumed, self._ran = not self._ran, True
        if self.mode == "auto" and self.stats.state == "clear":
            return self._raw(near, tail)
        if self.stats.processed_ms <= CAUTIOUS_MS:
            out = self._cautious(out)
        self.stats.cancelled_ms += ms
        if resumed and self._delayed and tail.size and whole >= tail.size:
            # The canceller's first samples are what it held when it last stopped: those went
            # out unprocessed through the delay line; the same delay continues from it.
            out = np.concatenate([tail, out[tail.size:]])
        self._delayed = True
        return out.tobytes()

    def _cautious(self, out: np.ndarray) -> np.ndarray:
        """What an echo of the model can be at most (as loud as the model's loudest 10 ms of
        the last 0.6 s: a phone's speaker right at its microphone) is turned down by
        CAUTIOUS_GAIN while the canceller converges; anything louder is the caller."""
        far = list(self._env_far)[-MAX_DELAY_BLOCKS:]
        if not far:
            return out
        blocks = out.reshape(-1, BLOCK).astype(np.float32)
        rms = np.sqrt(np.mean(np.square(blocks), axis=1))
        # (blocks below VOICED_DBFS are left alone: no VAD hears them, and turned down they
        # would round to digital silence)
        quiet = (rms < max(far)) & (rms > _VOICED_RMS)
        if not quiet.any():
            return out
        blocks[quiet] *= CAUTIOUS_GAIN
        return np.clip(np.round(blocks), -32768, 32767).astype(np.int16).reshape(-1)

    def close(self) -> None:
        """The call ended: the canceller's state goes now, not at the next collection."""
        self._aec = None
        self._ring = np.zeros(0, dtype=np.int16)
        self.mode = "off"

    def _raw(self, near: np.ndarray, tail: np.ndarray) -> bytes:
        """The caller's audio as it came: behind the canceller's delay while its output is what
        the model gets (no seam when it stops and starts), at once when the call is clear."""
        if self._delayed and self.mode == "auto" and self.stats.state == "clear":
            self._delayed = False  # back to no delay: the delay line's few ms go, once per call
        if not self._delayed or not tail.size:
            return near.tobytes()
        return np.concatenate([tail, near])[:near.size].tobytes()

    def _align(self, n: int) -> int:
        """Where the reference for the next `n` caller samples starts."""
        lead = int(LEAD_S * REALTIME_RATE)
        home = self._written - lead - n
        if self._cursor is None:
            return home
        lag = self._written - (self._cursor + n)
        if lag < 0 or lag > lead + int(RESYNC_S * REALTIME_RATE):
            self.stats.resyncs += 1
            return home
        return self._cursor

    def _read(self, start: int, n: int) -> np.ndarray:
        out = np.zeros(n, dtype=np.int16)
        lo = max(start, self._written - self._ring.size, 0)
        hi = min(start + n, self._written)
        if hi > lo:
            idx = np.arange(lo, hi) % self._ring.size
            out[lo - start:hi - start] = self._ring[idx]
        return out

    def _judge(self, near: np.ndarray, far: np.ndarray, out: np.ndarray) -> None:
        """Per second of model speech: is the model's voice in the caller's audio?

        Not read from what the canceller removed: until its filter has converged AEC3
        suppresses a caller with no echo at all by 10-15 dB (it cannot tell yet). The test is
        the echo's own signature instead: the caller's level follows the model's, some
        delay later. Amplitude envelopes (10 ms blocks) of the two are correlated at every
        delay up to 0.6 s."""
        # (near, far and out are whole 10 ms blocks: process() hands over nothing else)
        near_sq = np.square(near.astype(np.float32)).reshape(-1, BLOCK).sum(1)
        far_sq = np.square(far.astype(np.float32)).reshape(-1, BLOCK).sum(1)
        self._env_near.extend(np.sqrt(near_sq / BLOCK))
        self._env_far.extend(np.sqrt(far_sq / BLOCK))
        self._window_far += float(far_sq.sum())
        self._window_in += float(near_sq.sum())
        self._window_out += _energy(out.astype(np.float32))
        self._window_n += near.size
        if self._window_n < WINDOW_S * REALTIME_RATE:
            return
        e_in, e_out, e_far, n = self._window_in, self._window_out, self._window_far, self._window_n
        self._window_in = self._window_out = self._window_far = 0.0
        self._window_n = 0
        self._speech_s += n / REALTIME_RATE
        if _dbfs(e_in, n) < FLOOR_DBFS:
            # The caller is quiet while the model speaks up: no echo worth the name comes back
            # (a browser's own canceller took it, or headphones); a quiet model says nothing.
            if _dbfs(e_far, n) >= AUDIBLE_MODEL_DBFS:
                self._no_echo_window()
            return
        similarity = echo_similarity(np.asarray(self._env_near), np.asarray(self._env_far))
        if similarity >= DETECT_SIMILARITY:
            removed = 10 * math.log10(max(e_in, 1.0) / max(e_out, 1.0))
            self.stats.erle_db.append(round(removed, 1))
            del self.stats.erle_db[:-600]
            self._quiet_windows = 0
            if not self.stats.detected:
                self.stats.detected = True
                self.stats.detected_after_s = round(self._speech_s, 1)
                logger.info("call %s: echo of the model's voice in the caller's audio (similarity %.2f, %.0f dB "
                            "removed, after %.1f s of model speech): echo guard engaged", self.call_id, similarity,
                            removed, self._speech_s)
            self.stats.state = "echo"
        elif similarity < CLEAR_SIMILARITY:
            self._no_echo_window()

    def _no_echo_window(self) -> None:
        if self.stats.state != "listening":
            return
        self._quiet_windows += 1
        if self._quiet_windows >= CLEAR_WINDOWS:
            self.stats.state = "clear"
            self.stats.cleared_after_s = round(self._speech_s, 1)
            logger.debug("call %s: no echo after %.0f s of model speech", self.call_id, self._speech_s)


def echo_similarity(near_env: np.ndarray, far_env: np.ndarray) -> float:
    """The best Pearson correlation of the caller's envelope with the model's, the model's
    leading by 0 to `MAX_DELAY_S` (10 ms blocks, aligned sample for sample)."""
    size = min(near_env.size, far_env.size)
    near_env, far_env = near_env[-size:], far_env[-size:]
    best = 0.0
    for lag in range(0, min(MAX_DELAY_BLOCKS, size - MIN_OVERLAP_BLOCKS)):
        a = near_env[lag:]
        b = far_env[:size - lag]
        if a.std() < 1e-6 or b.std() < 1e-6:
            continue
        best = max(best, float(np.corrcoef(a, b)[0, 1]))
    return best
