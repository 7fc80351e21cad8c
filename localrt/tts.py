"""Text-to-speech: espeak-ng (Debian package) in a subprocess, streamed.

espeak-ng writes its WAV to stdout as it synthesises, so audio is forwarded (resampled
from espeak's 22.05 kHz to 24 kHz) while the rest of the sentence is still being
made. A subprocess per sentence keeps the CPU work off the event loop and lets
sessions synthesise in parallel.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
from typing import AsyncIterator

from media.audio import REALTIME_RATE
from media.resample import StreamResampler

# OpenAI voice names → espeak-ng voices (variants differ in pitch and timbre).
VOICES = {
    "alloy": "en-us+m3", "ash": "en-us+m1", "ballad": "en-gb+m2", "coral": "en-us+f2",
    "echo": "en-us+m4", "sage": "en-us+f3", "shimmer": "en-us+f4", "verse": "en-us+m5",
    "marin": "en-us+f1", "cedar": "en-us+m2",
}
BASE_WPM = 165


class TTSError(Exception):
    pass


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak_voice(voice: str) -> str:
    return VOICES.get(voice, voice if voice.startswith(("en", "mb-")) else "en-us")


async def synthesize(text: str, voice: str = "alloy", speed: float = 1.0) -> AsyncIterator[bytes]:
    """Yield 24 kHz PCM16 mono chunks of `text` spoken, as espeak-ng produces them."""
    wpm = str(max(80, min(450, int(BASE_WPM * speed))))
    proc = await asyncio.create_subprocess_exec(
        "espeak-ng", "-v", espeak_voice(voice), "-s", wpm, "--stdout", text,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        header = await proc.stdout.readexactly(44)
        if header[:4] != b"RIFF":
            raise TTSError("espeak-ng did not produce WAV audio")
        rate = struct.unpack("<I", header[24:28])[0]
        resampler = StreamResampler(REALTIME_RATE)
        carry = b""
        while True:
            data = await proc.stdout.read(8192)
            if not data:
                break
            data = carry + data
            usable = len(data) - len(data) % 2
            carry = data[usable:]
            if usable:
                yield resampler.pcm(data[:usable], rate).tobytes()
        await proc.wait()
    except asyncio.IncompleteReadError:
        err = (await proc.stderr.read()).decode(errors="replace").strip() if proc.stderr else ""
        raise TTSError(f"espeak-ng failed: {err or 'no output'}") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
