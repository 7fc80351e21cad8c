"""Speech-to-text: pocketsphinx with the US-English model that ships in its wheel.

Decoding is CPU work, so every call into the decoder runs on a worker thread;
one `Transcriber` per session keeps its calls in order (a decoder is not
thread-safe) and feeds the utterance while it is spoken, so only the tail is
left to decode when the turn ends.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import pocketsphinx

_EXECUTOR = ThreadPoolExecutor(max_workers=4, thread_name_prefix="stt")


class Transcriber:
    def __init__(self) -> None:
        self._decoder: Optional[pocketsphinx.Decoder] = None
        self._lock = asyncio.Lock()
        self._in_utt = False

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(_EXECUTOR, fn, *args)

    def _ensure(self) -> pocketsphinx.Decoder:
        if self._decoder is None:
            config = pocketsphinx.Config(loglevel="FATAL")
            self._decoder = pocketsphinx.Decoder(config)
        return self._decoder

    async def warm_up(self) -> None:
        async with self._lock:
            await self._run(self._ensure)

    async def begin(self) -> None:
        async with self._lock:
            await self._run(self._begin)

    def _begin(self) -> None:
        d = self._ensure()
        if self._in_utt:
            d.end_utt()
        d.start_utt()
        self._in_utt = True

    async def feed(self, pcm16k: bytes) -> None:
        async with self._lock:
            if self._in_utt:
                await self._run(self._decoder.process_raw, pcm16k, False, False)

    async def finish(self, tail16k: bytes = b"") -> str:
        async with self._lock:
            return await self._run(self._finish, tail16k)

    def _finish(self, tail: bytes) -> str:
        d = self._ensure()
        if not self._in_utt:
            return ""
        if tail:
            d.process_raw(tail, False, False)
        d.end_utt()
        self._in_utt = False
        hyp = d.hyp()
        return hyp.hypstr.strip() if hyp is not None else ""

    async def transcribe(self, pcm16k: bytes) -> str:
        """Whole-buffer transcription (client-committed turns)."""
        await self.begin()
        return await self.finish(pcm16k)
