"""Model worker processes, spoken to over pipes with asyncio.

Speech models are CPU work measured in hundreds of milliseconds, and the
inference engines hold the GIL for parts of it: in threads they would stall the
event loop that paces every call's audio. So each model lives in worker
processes (`python -m localrt.stt`, `python -m localrt.tts`), loaded once when the
worker starts; nothing on the event loop waits for them.

Wire format, both ways: header `<IBII` = request id, op (requests) or status
(replies), session id, payload length; then the payload. A worker says READY
(request id 0) with a one-line description once its model is loaded, or ERROR
with the reason and exits. A reply is zero or more CHUNKs, then OK or ERROR.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import struct
import sys
import time
from typing import AsyncIterator, Callable, Optional

logger = logging.getLogger(__name__)

HEADER = struct.Struct("<IBII")
REPLY_OK, REPLY_ERROR, REPLY_CHUNK, REPLY_READY = 0, 1, 2, 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: A model that takes longer than this to load is reported as broken.
LOAD_TIMEOUT_S = 120.0


class WorkerError(Exception):
    pass


class Worker:
    """One worker process; requests may be in flight from several sessions at once."""

    def __init__(self, module: str, args: list[str]) -> None:
        self.module, self.args = module, args
        self.proc: Optional[asyncio.subprocess.Process] = None
        self.sessions = 0
        self.info = ""
        self._pending: dict[int, asyncio.Queue] = {}
        self._ids = itertools.count(1)
        self._reader: Optional[asyncio.Task] = None
        self._ready: Optional[asyncio.Future] = None

    async def start(self) -> str:
        """Start the process and wait until its model is loaded; returns its description."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", self.module, *self.args, cwd=ROOT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 24)
        self._ready = asyncio.get_running_loop().create_future()
        self._reader = asyncio.get_running_loop().create_task(self._read())
        try:
            self.info = await asyncio.wait_for(asyncio.shield(self._ready), LOAD_TIMEOUT_S)
        except asyncio.TimeoutError:
            await self.stop()
            raise WorkerError(f"the model did not load within {LOAD_TIMEOUT_S:g} s") from None
        return self.info

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._pending)

    async def _read(self) -> None:
        assert self.proc and self.proc.stdout
        try:
            while True:
                header = await self.proc.stdout.readexactly(HEADER.size)
                rid, status, _, size = HEADER.unpack(header)
                payload = await self.proc.stdout.readexactly(size) if size else b""
                if rid == 0:
                    if self._ready and not self._ready.done():
                        if status == REPLY_READY:
                            self._ready.set_result(payload.decode("utf-8", "replace"))
                        else:
                            self._ready.set_exception(WorkerError(payload.decode("utf-8", "replace")))
                    continue
                queue = self._pending.get(rid)
                if queue is None:
                    continue
                if status != REPLY_CHUNK:
                    self._pending.pop(rid, None)
                queue.put_nowait((status, payload))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if self._ready and not self._ready.done():
                self._ready.set_exception(WorkerError("the worker exited while loading its model"))
            for queue in self._pending.values():
                queue.put_nowait((REPLY_ERROR, b"the model worker exited"))
            self._pending.clear()

    def _send(self, op: int, sid: int, payload: bytes, reply: bool) -> Optional[asyncio.Queue]:
        if not self.alive:
            raise WorkerError("the model worker is not running")
        rid = next(self._ids)
        queue: Optional[asyncio.Queue] = None
        if reply:
            queue = self._pending[rid] = asyncio.Queue()
        assert self.proc and self.proc.stdin
        self.proc.stdin.write(HEADER.pack(rid, op, sid, len(payload)) + payload)
        return queue

    async def call(self, op: int, sid: int, payload: bytes = b"", *, reply: bool = False) -> bytes:
        """One request; with `reply`, wait for its answer (chunks are joined)."""
        queue = self._send(op, sid, payload, reply)
        assert self.proc and self.proc.stdin
        await self.proc.stdin.drain()
        if queue is None:
            return b""
        return b"".join([chunk async for chunk in _drain(queue)])

    async def stream(self, op: int, sid: int, payload: bytes = b"") -> AsyncIterator[bytes]:
        """One request whose answer comes in chunks, yielded as they arrive."""
        queue = self._send(op, sid, payload, True)
        assert self.proc and self.proc.stdin and queue is not None
        await self.proc.stdin.drain()
        async for chunk in _drain(queue):
            yield chunk

    async def stop(self) -> None:
        if self.alive:
            assert self.proc and self.proc.stdin
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 2)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


async def _drain(queue: asyncio.Queue) -> AsyncIterator[bytes]:
    while True:
        status, payload = await queue.get()
        if status == REPLY_ERROR:
            raise WorkerError(payload.decode("utf-8", "replace"))
        if payload:
            yield payload
        if status == REPLY_OK:
            return


class WorkerPool:
    """Worker processes shared by the sessions of one event loop; each session sticks to one."""

    def __init__(self, module: str, args: list[str], size: Optional[int] = None, *, what: str = "model") -> None:
        self.module, self.args, self.what = module, args, what
        self.size = size or max(1, os.cpu_count() or 1)
        self.workers: list[Worker] = []
        self._lock = asyncio.Lock()
        self.info = ""

    async def start(self) -> None:
        """Bring the pool to its size (restarting dead workers). Raises WorkerError if the
        model cannot load."""
        async with self._lock:
            self.workers = [w for w in self.workers if w.alive]
            missing = self.size - len(self.workers)
            if missing <= 0:
                return
            started = time.monotonic()
            new = [Worker(self.module, self.args) for _ in range(missing)]
            results = await asyncio.gather(*(w.start() for w in new), return_exceptions=True)
            failed = next((r for r in results if isinstance(r, BaseException)), None)
            if failed is not None:
                await asyncio.gather(*(w.stop() for w in new), return_exceptions=True)
                raise failed if isinstance(failed, WorkerError) else WorkerError(str(failed))
            first = not self.info
            self.workers += new
            self.info = new[0].info
            if first:
                logger.info("local backend: %s %s, loaded in %.1f s (%d worker process%s)", self.what, self.info,
                            time.monotonic() - started, len(new), "" if len(new) == 1 else "es")

    async def acquire(self) -> Worker:
        await self.start()
        worker = min(self.workers, key=lambda w: w.sessions)
        worker.sessions += 1
        return worker

    def release(self, worker: Worker) -> None:
        worker.sessions -= 1

    def least_busy(self) -> Worker:
        """The running worker with the fewest requests under way (for one-off requests that
        need no session state)."""
        alive = [w for w in self.workers if w.alive]
        if not alive:
            raise WorkerError("no model worker is running")
        return min(alive, key=lambda w: w.in_flight)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None and w.alive]

    async def close(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)
        self.workers = []


# -- the worker side ---------------------------------------------------------------------


Reply = Callable[[int, bytes], None]


def serve(load: Callable[[], str], handle: Callable[[int, int, bytes, Reply], None]) -> None:
    """A worker's main loop: `load()` the model (its return value is the READY line),
    then `handle(op, sid, payload, reply)` each request; `reply(status, data)` answers it."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    # Libraries that print would corrupt the pipe: their stdout goes to stderr.
    sys.stdout = sys.stderr

    def write(rid: int, status: int, data: bytes) -> None:
        stdout.write(HEADER.pack(rid, status, 0, len(data)) + data)
        stdout.flush()

    try:
        info = load()
    except Exception as exc:  # reported to the parent, which says it in one line
        write(0, REPLY_ERROR, f"{type(exc).__name__}: {exc}".encode())
        raise SystemExit(1) from None
    write(0, REPLY_READY, info.encode())
    while True:
        header = stdin.read(HEADER.size)
        if len(header) < HEADER.size:
            return
        rid, op, sid, size = HEADER.unpack(header)
        payload = stdin.read(size) if size else b""
        try:
            handle(op, sid, payload, lambda status, data, rid=rid: write(rid, status, data))
        except Exception as exc:  # report, keep serving the other sessions
            write(rid, REPLY_ERROR, f"{type(exc).__name__}: {exc}".encode())
