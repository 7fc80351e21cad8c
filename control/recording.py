"""Opt-in call recording (`RECORD_AUDIO=dir`): one stereo Ogg/Opus file per call.

Left: the caller, as the bridge decoded it (after loss recovery). Right: the model,
as it was sent to the caller — the frames the playback track put on the wire, so
a reply cut by a barge-in is recorded as far as it was heard, and nothing that
was flushed unplayed. Both sides sit on one timeline, the server's clock: each
chunk lands where its arrival time puts it, and a side that went quiet (no
packets while the caller's network was away, or before the first reply) is
filled with silence, so the two stay aligned however long the call.

Encoding (PyAV's libopus, 24 kHz stereo, 20 ms frames, 64 kb/s) and file writes run on
one thread shared by all calls, fed in one-second blocks: the event loop only
copies PCM into a buffer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import av
import numpy as np

logger = logging.getLogger(__name__)

RATE = 24000
#: A side this far behind the clock when new audio comes is re-aligned with silence.
GAP_S = 0.1
#: Audio is encoded in blocks this long; a side may lag the clock this much before silence is assumed.
BLOCK_S = 1.0
LAG_S = 0.5
BITRATE = 64000


class Recordings:
    """The folder and the encoding thread, for every call of this process."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recording")
        self._open: set[Recorder] = set()

    def start(self, call_id: str) -> "Recorder":
        recorder = Recorder(str(self.folder / f"{call_id}.ogg"), self._pool, on_done=self._open.discard)
        self._open.add(recorder)
        return recorder

    async def close(self) -> None:
        for recorder in list(self._open):
            recorder.finish()
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)


class Recorder:
    def __init__(self, path: str, pool: ThreadPoolExecutor, *, clock: Callable[[], float] = time.monotonic,
                 on_done: Optional[Callable[["Recorder"], None]] = None) -> None:
        self.path = path
        self._pool = pool
        self._clock = clock
        self._on_done = on_done
        self._t0: Optional[float] = None
        self._emitted = 0  # samples written to the file (both sides)
        self._cursor = [0, 0]  # each side's end, in samples from t0
        self._pending = [bytearray(), bytearray()]  # each side from `_emitted` to its cursor
        self._last_flush = 0.0
        self._writer: Optional[_Writer] = None
        self._finished = False

    def caller(self, pcm: bytes) -> None:
        self._add(0, pcm)

    def model(self, pcm: bytes) -> None:
        self._add(1, pcm)

    def _add(self, side: int, pcm: bytes) -> None:
        if self._finished or not pcm:
            return
        now = self._clock()
        if self._t0 is None:
            self._t0 = self._last_flush = now
        n = len(pcm) // 2
        start = int((now - self._t0) * RATE) - n  # where it belongs, had it just arrived on time
        gap = start - self._cursor[side]
        if gap > GAP_S * RATE:
            self._pending[side] += bytes(gap * 2)
            self._cursor[side] += gap
        self._pending[side] += pcm[: n * 2]
        self._cursor[side] += n
        if now - self._last_flush >= BLOCK_S:
            self._flush(now)

    def _flush(self, now: float, final: bool = False) -> None:
        assert self._t0 is not None
        self._last_flush = now
        if final:
            upto = max(self._cursor)
        else:
            # what both sides have; a side lagging the clock by more than LAG_S is quiet, not late
            upto = max(min(self._cursor), int((now - self._t0 - LAG_S) * RATE))
            upto = min(upto, max(self._cursor))
        n = upto - self._emitted
        if n <= 0:
            return
        sides = []
        for i in (0, 1):
            have = len(self._pending[i]) // 2
            if have < n:
                self._pending[i] += bytes((n - have) * 2)
                self._cursor[i] = upto
            sides.append(np.frombuffer(bytes(self._pending[i][: n * 2]), dtype="<i2"))
            del self._pending[i][: n * 2]
        self._emitted = upto
        stereo = np.column_stack(sides).reshape(1, -1)
        if self._writer is None:
            self._writer = _Writer(self.path)
        self._pool.submit(self._writer.write, stereo)

    def finish(self) -> None:
        """Write what is left and close the file (on the encoding thread)."""
        if self._finished:
            return
        if self._t0 is not None:
            self._flush(self._clock(), final=True)
        self._finished = True
        if self._writer is not None:
            self._pool.submit(self._writer.close)
        if self._on_done is not None:
            self._on_done(self)


class _Writer:
    """The Ogg/Opus file (used from the encoding thread only)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._container = None
        self._stream = None
        self._rest = np.zeros((1, 0), dtype="<i2")
        self._pts = 0
        self.failed = False

    def _open(self) -> None:
        self._container = av.open(self.path + ".part", "w", format="ogg")
        stream = self._container.add_stream("libopus", rate=RATE)
        stream.layout = "stereo"
        stream.bit_rate = BITRATE
        self._stream = stream

    def write(self, stereo: np.ndarray) -> None:
        if self.failed:
            return
        try:
            if self._container is None:
                self._open()
            data = np.concatenate([self._rest, stereo], axis=1)
            size = (self._stream.codec_context.frame_size or 480) * 2
            whole = data.shape[1] // size * size
            for start in range(0, whole, size):
                self._encode(data[:, start:start + size])
            self._rest = data[:, whole:]
        except Exception as exc:  # a full disk: the call goes on, unrecorded
            self.failed = True
            logger.error("recording %s failed: %s: %s", self.path, type(exc).__name__, exc)

    def _encode(self, chunk: np.ndarray) -> None:
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="s16", layout="stereo")
        frame.sample_rate = RATE
        frame.pts = self._pts
        self._pts += chunk.shape[1] // 2
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        if self._container is None or self.failed:
            return
        try:
            if self._rest.shape[1]:
                size = (self._stream.codec_context.frame_size or 480) * 2
                pad = np.zeros((1, size - self._rest.shape[1]), dtype="<i2")
                self._encode(np.concatenate([self._rest, pad], axis=1))
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            Path(self.path + ".part").rename(self.path)  # a file with its final name is complete
        except Exception as exc:
            logger.error("recording %s could not be finished: %s: %s", self.path, type(exc).__name__, exc)
