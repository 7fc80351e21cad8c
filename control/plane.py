"""What server-side control adds to every call, and its process-wide parts' lifetimes.

The registry tells the plane when a call is made and when it has closed. A new
call gets the server's tools and (with RECORD_AUDIO) a recorder; its record is
written at once (status "active") and again when it ends, and then handed to the
webhook outbox. Every write is a task of its own: a call never waits on the
database, and shutdown waits for the writes in flight before closing it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Optional

import aiohttp
from aiohttp import web

from realtime.policy import ClientEventPolicy
from settings import SIDEBAND_SESSION_FIELDS, Settings

from .records import RecordStore, open_store
from .tools import CallTools, ToolSet
from .webhooks import Deliverer

if TYPE_CHECKING:
    from realtime.call import Call

logger = logging.getLogger(__name__)


class ControlPlane:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        path = settings.records_db
        self.store: Optional[RecordStore] = open_store(path) if path and path.lower() != "none" else None
        self.deliverer: Optional[Deliverer] = None
        if settings.webhook_url and self.store is not None:
            self.deliverer = Deliverer(self.store, settings.webhook_url, settings.webhook_secret or "")
        self.toolset: ToolSet = settings.tools or ToolSet()
        self.sideband_policy = ClientEventPolicy(settings.sideband_client_events, SIDEBAND_SESSION_FIELDS)
        self.http: Optional[aiohttp.ClientSession] = None
        self._writes: set[asyncio.Task] = set()
        self.write_failures = 0
        self.recordings = None  # control.recording.Recordings, with RECORD_AUDIO
        self._pruner: Optional[asyncio.Task] = None
        self.metrics = None  # signaling.prom.BridgeMetrics, set by the app

    async def start(self) -> None:
        if self.store is not None:
            await self.store.open()
            if self.settings.records_keep_days > 0:
                self._pruner = asyncio.get_running_loop().create_task(self._prune(), name="records-prune")
        if self.deliverer is not None:
            self.deliverer.start()
        if self.toolset:
            self.http = aiohttp.ClientSession()
        if self.settings.record_audio:
            from .recording import Recordings

            self.recordings = Recordings(self.settings.record_audio)

    async def _prune(self) -> None:
        """Records (and their sent webhooks) older than RECORDS_KEEP_DAYS go, at start and hourly."""
        assert self.store is not None
        while True:
            try:
                gone = await self.store.prune(time.time() - self.settings.records_keep_days * 86400)
                if gone:
                    logger.info("records: %d older than %g days removed", gone, self.settings.records_keep_days)
            except Exception as exc:  # a busy database: next hour
                logger.warning("records: pruning failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(3600)

    async def stop(self) -> None:
        if self._pruner is not None:
            self._pruner.cancel()
            await asyncio.gather(self._pruner, return_exceptions=True)
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self.recordings is not None:
            await self.recordings.close()
        if self.deliverer is not None:
            await self.deliverer.stop()
        if self.http is not None:
            await self.http.close()
        if self.store is not None:
            await self.store.close()

    # -- per call ------------------------------------------------------------------

    def call_created(self, call: "Call") -> None:
        if self.toolset and self.http is not None:
            call.tools = CallTools(self.toolset, self.http, call.id, send=call.send_upstream,
                                   spawn=call.spawn_task, busy=lambda: call.conversation.active_response is not None,
                                   ran=lambda *a: self._tool_ran(call, *a))
        if self.recordings is not None:
            call.recorder = self.recordings.start(call.id)
            call.playback.pcm_taps.append(call.recorder.model)
            call.record.data["recording"] = call.recorder.path
        self._write(call.record.data, final=False)

    def _tool_ran(self, call: "Call", call_id: str, name: str, status: str, output: str, duration_ms: int) -> None:
        call.record.tool_ran(call_id, name, status, output, duration_ms)
        if self.metrics is not None:
            self.metrics.tool_ran(name, status, duration_ms)

    def call_closed(self, call: "Call") -> None:
        if call.recorder is not None:
            call.recorder.finish()
        self._write(call.record.data, final=True)

    def _write(self, record: dict, *, final: bool) -> None:
        if self.store is None:
            return
        snapshot = dict(record)  # the call goes on changing it
        task = asyncio.get_running_loop().create_task(self._save(snapshot, final))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _save(self, record: dict, final: bool) -> None:
        assert self.store is not None
        try:
            await self.store.save(record)
            if final and self.deliverer is not None:
                await self.deliverer.enqueue(record)
        except Exception as exc:  # a full disk, a locked file: the call is over either way
            self.write_failures += 1
            logger.error("call %s: its record could not be written: %s: %s", record.get("id"), type(exc).__name__, exc)


PLANE = web.AppKey("control_plane", ControlPlane)


def install(app: web.Application, settings: Settings) -> ControlPlane:
    plane = ControlPlane(settings)
    app[PLANE] = plane

    async def lifecycle(app: web.Application):
        await plane.start()
        yield
        await plane.stop()

    app.cleanup_ctx.append(lifecycle)
    return plane
