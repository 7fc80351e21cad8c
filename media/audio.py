"""Audio constants and PCM helpers: every rate and frame size is named here once."""

from __future__ import annotations

import numpy as np

#: The Realtime API's `audio/pcm` format: 24 kHz, 16-bit little-endian, mono.
REALTIME_RATE = 24_000
#: WebRTC Opus always runs at 48 kHz.
RTP_RATE = 48_000
FRAME_MS = 20
#: Samples in one 20 ms frame at the Realtime rate (480).
FRAME_SAMPLES = REALTIME_RATE * FRAME_MS // 1000
#: Bytes in one 20 ms PCM16 frame at the Realtime rate (960).
FRAME_BYTES = FRAME_SAMPLES * 2
SAMPLE_WIDTH = 2


def samples_to_ms(samples: int, rate: int = REALTIME_RATE) -> int:
    """Whole milliseconds contained in `samples` (rounded down, never over)."""
    return samples * 1000 // rate


def ms_to_samples(ms: float, rate: int = REALTIME_RATE) -> int:
    return int(ms * rate // 1000)


def pcm16_to_float(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def rms_dbfs(pcm: bytes) -> float:
    """Level of a PCM16 buffer in dBFS (-120 for silence)."""
    x = pcm16_to_float(pcm)
    if x.size == 0:
        return -120.0
    rms = float(np.sqrt(np.mean(x * x)))
    return 20.0 * np.log10(rms) if rms > 1e-6 else -120.0


def dominant_frequency(pcm: bytes, rate: int = REALTIME_RATE) -> float:
    """Frequency (Hz) of the strongest spectral peak of a PCM16 buffer."""
    x = pcm16_to_float(pcm)
    if x.size < 16:
        return 0.0
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    spectrum[0] = 0.0
    peak = int(np.argmax(spectrum))
    # Parabolic interpolation around the bin gives sub-bin precision.
    if 0 < peak < spectrum.size - 1:
        a, b, c = spectrum[peak - 1], spectrum[peak], spectrum[peak + 1]
        denom = a - 2 * b + c
        offset = 0.5 * (a - c) / denom if denom else 0.0
    else:
        offset = 0.0
    return (peak + offset) * rate / x.size


def tone(freq: float, ms: float, rate: int = REALTIME_RATE, level: float = 0.5) -> bytes:
    """A PCM16 sine tone, handy for tests, the stub and benchmarks."""
    n = ms_to_samples(ms, rate)
    t = np.arange(n) / rate
    return float_to_pcm16(level * np.sin(2 * np.pi * freq * t))
