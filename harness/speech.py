"""Speech fixtures made on the spot with espeak-ng and sox (Debian packages)."""

from __future__ import annotations

import subprocess
import wave
from pathlib import Path


def speech_wav(text: str, path: Path, *, rate: int = 48000, pad_s: float = 2.0, voice: str = "en-us") -> Path:
    """`text` spoken by espeak-ng, resampled to `rate` mono PCM16, with `pad_s` of silence after."""
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(raw), text], check=True, capture_output=True)
    subprocess.run(["sox", str(raw), "-r", str(rate), "-c", "1", "-b", "16", str(path), "pad", "0.5", str(pad_s)],
                   check=True, capture_output=True)
    raw.unlink()
    return path


def read_pcm(path: Path) -> tuple[bytes, int]:
    with wave.open(str(path)) as w:
        return w.readframes(w.getnframes()), w.getframerate()


def recognize(pcm: bytes, rate: int) -> str:
    """What pocketsphinx hears in PCM16 mono audio (resampled to 16 kHz with sox)."""
    import pocketsphinx

    proc = subprocess.run(["sox", "-t", "raw", "-r", str(rate), "-e", "signed", "-b", "16", "-c", "1", "-",
                           "-t", "raw", "-r", "16000", "-"], input=pcm, capture_output=True, check=True)
    decoder = pocketsphinx.Decoder(pocketsphinx.Config(loglevel="FATAL"))
    decoder.start_utt()
    decoder.process_raw(proc.stdout, False, True)
    decoder.end_utt()
    hyp = decoder.hyp()
    return hyp.hypstr if hyp else ""
