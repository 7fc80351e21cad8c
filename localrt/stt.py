"""Speech-to-text: pocketsphinx with the US-English model that ships in its wheel.

pocketsphinx holds the GIL while it decodes (measured: a 2.5 s decode on a worker
thread left the event loop two ticks), so threads would stall every session. The
decoders live in worker processes instead (`python -m localrt.stt`, one per
core), spoken to over pipes with asyncio: nothing on the event loop waits. Each
session is pinned to one worker, which keeps its streaming decoder, so the
utterance is decoded while it is spoken and only the tail is left at the turn's end.

Wire format (both ways): header `<IBII` = request id, op, session id, payload
length; then the payload. Replies carry `op` 0 (ok, UTF-8 text) or 1 (error).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import struct
import sys
from typing import Optional

logger = logging.getLogger(__name__)

HEADER = struct.Struct("<IBII")
OP_BEGIN, OP_FEED, OP_FINISH, OP_TRANSCRIBE, OP_CLOSE = 1, 2, 3, 4, 5
REPLY_OK, REPLY_ERROR = 0, 1


class STTError(Exception):
    pass


class _Worker:
    def __init__(self) -> None:
        self.proc: Optional[asyncio.subprocess.Process] = None
        self.sessions = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._reader: Optional[asyncio.Task] = None

    async def start(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "localrt.stt", cwd=root,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def _read(self) -> None:
        assert self.proc and self.proc.stdout
        try:
            while True:
                header = await self.proc.stdout.readexactly(HEADER.size)
                rid, status, _, size = HEADER.unpack(header)
                payload = await self.proc.stdout.readexactly(size) if size else b""
                fut = self._pending.pop(rid, None)
                if fut and not fut.done():
                    if status == REPLY_OK:
                        fut.set_result(payload.decode("utf-8"))
                    else:
                        fut.set_exception(STTError(payload.decode("utf-8", "replace")))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(STTError("speech-to-text worker exited"))
            self._pending.clear()

    async def call(self, op: int, sid: int, payload: bytes = b"", *, reply: bool = False) -> str:
        if not self.alive:
            raise STTError("speech-to-text worker is not running")
        rid = next(self._ids)
        fut = None
        if reply:
            fut = asyncio.get_running_loop().create_future()
            self._pending[rid] = fut
        assert self.proc and self.proc.stdin
        self.proc.stdin.write(HEADER.pack(rid, op, sid, len(payload)) + payload)
        await self.proc.stdin.drain()
        return await fut if fut else ""

    async def stop(self) -> None:
        if self.alive:
            assert self.proc
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 2)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader:
            self._reader.cancel()


class STTPool:
    """Worker processes shared by the sessions of one event loop."""

    def __init__(self, workers: Optional[int] = None) -> None:
        self.size = workers or max(1, os.cpu_count() or 1)
        self._workers: list[_Worker] = []
        self._lock = asyncio.Lock()
        self._sids = itertools.count(1)

    async def start(self) -> None:
        async with self._lock:
            self._workers = [w for w in self._workers if w.alive]
            while len(self._workers) < self.size:
                w = _Worker()
                await w.start()
                self._workers.append(w)

    async def acquire(self) -> tuple[_Worker, int]:
        await self.start()
        worker = min(self._workers, key=lambda w: w.sessions)
        worker.sessions += 1
        return worker, next(self._sids)

    def release(self, worker: _Worker) -> None:
        worker.sessions -= 1

    async def close(self) -> None:
        await asyncio.gather(*(w.stop() for w in self._workers), return_exceptions=True)
        self._workers = []


class Transcriber:
    """One session's recogniser: calls are ordered by the caller (one worker task)."""

    def __init__(self, pool: STTPool) -> None:
        self._pool = pool
        self._worker: Optional[_Worker] = None
        self._sid = 0

    async def _w(self) -> _Worker:
        if self._worker is None or not self._worker.alive:
            if self._worker is not None:
                self._pool.release(self._worker)
            self._worker, self._sid = await self._pool.acquire()
        return self._worker

    async def begin(self) -> None:
        await (await self._w()).call(OP_BEGIN, self._sid)

    async def feed(self, pcm16k: bytes) -> None:
        await (await self._w()).call(OP_FEED, self._sid, pcm16k)

    async def finish(self, tail16k: bytes = b"") -> str:
        return (await (await self._w()).call(OP_FINISH, self._sid, tail16k, reply=True)).strip()

    async def transcribe(self, pcm16k: bytes) -> str:
        """Whole-buffer transcription (client-committed turns)."""
        return (await (await self._w()).call(OP_TRANSCRIBE, self._sid, pcm16k, reply=True)).strip()

    async def close(self) -> None:
        if self._worker is not None:
            worker, self._worker = self._worker, None
            self._pool.release(worker)
            if worker.alive:
                try:
                    await worker.call(OP_CLOSE, self._sid)
                except (STTError, ConnectionError):
                    pass


# -- the worker process ----------------------------------------------------------------


def _worker_main() -> None:
    import pocketsphinx

    def new_decoder() -> "pocketsphinx.Decoder":
        return pocketsphinx.Decoder(pocketsphinx.Config(loglevel="FATAL"))

    spare = new_decoder()  # so the first session does not wait for a model load
    decoders: dict[int, pocketsphinx.Decoder] = {}
    in_utt: set[int] = set()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer

    def decoder(sid: int) -> "pocketsphinx.Decoder":
        nonlocal spare
        d = decoders.get(sid)
        if d is None:
            d = decoders[sid] = spare if spare is not None else new_decoder()
            spare = None
        return d

    def reply(rid: int, status: int, text: str) -> None:
        data = text.encode("utf-8")
        stdout.write(HEADER.pack(rid, status, 0, len(data)) + data)
        stdout.flush()

    def begin(sid: int) -> None:
        d = decoder(sid)
        if sid in in_utt:
            d.end_utt()
        d.start_utt()
        in_utt.add(sid)

    def end(sid: int, tail: bytes) -> str:
        d = decoder(sid)
        if sid not in in_utt:
            return ""
        if tail:
            d.process_raw(tail, False, False)
        d.end_utt()
        in_utt.discard(sid)
        hyp = d.hyp()
        return hyp.hypstr if hyp is not None else ""

    while True:
        header = stdin.read(HEADER.size)
        if len(header) < HEADER.size:
            return
        rid, op, sid, size = HEADER.unpack(header)
        payload = stdin.read(size) if size else b""
        try:
            if op == OP_BEGIN:
                begin(sid)
            elif op == OP_FEED:
                if sid in in_utt and payload:
                    decoder(sid).process_raw(payload, False, False)
            elif op == OP_FINISH:
                reply(rid, REPLY_OK, end(sid, payload))
            elif op == OP_TRANSCRIBE:
                begin(sid)
                reply(rid, REPLY_OK, end(sid, payload))
            elif op == OP_CLOSE:
                d = decoders.pop(sid, None)
                if d is not None and sid in in_utt:
                    d.end_utt()
                in_utt.discard(sid)
                if d is not None and spare is None:
                    spare = d
            if spare is None and not decoders:
                spare = new_decoder()
        except Exception as exc:  # report, keep serving the other sessions
            if op in (OP_FINISH, OP_TRANSCRIBE):
                reply(rid, REPLY_ERROR, f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    _worker_main()
