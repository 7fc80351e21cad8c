"""One call: the aiortc peer, the upstream Realtime session, and everything between.

The `Call` is the single owner of every resource the call makes. Whichever side
ends first (hangup, the page gone, ICE/DTLS failed or closed, no audio, the
upstream closing or failing, the time limit, server shutdown) calls `end()`
with a reason; `end()` is idempotent and tears everything down once: the page is
told why on `oai-events` if the channel is still open, tasks are cancelled, the
socket and the peer are closed, one line is logged.

Data path:
  caller RTP → MicPump → input_audio_buffer.append → upstream
  upstream response.output_audio.delta → PlaybackTrack → caller RTP
  upstream other events ↔ oai-events data channel (page → upstream through the policy)
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Coroutine, Optional

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcdatachannel import RTCDataChannel

from media import jitter
from media.mic import MicPump, MicTimeout
from media.playback import PlaybackTrack
from settings import Settings

from . import events
from .events import Client, ErrorCode, Event, Server
from .policy import ClientEventPolicy
from .upstream import UpstreamError, UpstreamSession

logger = logging.getLogger(__name__)

DATA_CHANNEL_LABEL = "oai-events"
#: Events for the page held until its data channel opens.
MAX_PENDING_PAGE_EVENTS = 500


class CallEnded(Exception):
    pass


class Call:
    def __init__(
        self,
        call_id: str,
        settings: Settings,
        upstream: UpstreamSession,
        policy: ClientEventPolicy,
        *,
        on_closed: Optional[Callable[["Call"], None]] = None,
    ) -> None:
        self.id = call_id
        self.settings = settings
        self.upstream = upstream
        self.policy = policy
        self._on_closed = on_closed
        ice = [RTCIceServer(urls=s.urls, username=s.username, credential=s.credential) for s in settings.ice_servers]
        # An explicit (possibly empty) list: None would mean Google's STUN server.
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=ice))
        self.playback = PlaybackTrack()
        self.playback.on_started = self._on_playback_started
        self.playback.on_stopped = self._on_playback_stopped
        self.mic: Optional[MicPump] = None
        self.receive_buffer: Optional[jitter.ReorderBuffer] = None
        self.channel: Optional[RTCDataChannel] = None
        self._pending_page: list[str] = []
        self._channel_ready = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._teardown_task: Optional[asyncio.Task] = None
        self.closed = asyncio.Event()
        self.reason: Optional[str] = None
        self.created_at = time.monotonic()
        self.connected_at: Optional[float] = None
        # response bookkeeping
        self._item_response: dict[str, Optional[str]] = {}
        self._cut_responses: set[str] = set()
        self._cut_items: set[str] = set()
        self._started_responses: set[str] = set()
        self.active_response: Optional[str] = None
        self.interrupt_response = True

    # -- setup ---------------------------------------------------------------------

    async def accept(self, offer_sdp: str) -> str:
        """Apply the browser's offer and return the SDP answer (all candidates included)."""
        pc = self.pc
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_connection_state)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        # Attach our track to the offered audio transceiver *before* createAnswer,
        # or the answer comes out recvonly.
        pc.addTrack(self.playback)
        await pc.setLocalDescription(await pc.createAnswer())
        return pc.localDescription.sdp

    async def open_upstream(self) -> None:
        """Connect to the Realtime server and configure the session.

        Run alongside `accept()`, so a refusing upstream becomes a precise HTTP
        error instead of a call that connects and then dies.
        """
        await self.upstream.connect(events.session_update(self.settings.session_config()))

    def start(self) -> None:
        """Start pumping upstream events and the call's timers (after `open_upstream`)."""
        self._spawn(self.upstream.write_loop(), "upstream-writer")
        self._spawn(self._read_upstream(), "upstream-reader")
        self._spawn(self._watch_connect(), "connect-timeout")
        self._spawn(self._watch_duration(), "max-duration")

    # -- ending --------------------------------------------------------------------

    def end(self, reason: str, *, code: str = ErrorCode.CALL_ENDED, tell_page: bool = True,
            wait_for_page: bool = False) -> None:
        """End the call once. `wait_for_page`: if the page's channel is not open yet,
        give it a moment to open so the page learns why (for failures early in a call)."""
        if self.reason is not None:
            return
        self.reason = reason
        self._teardown_task = asyncio.get_running_loop().create_task(
            self._teardown(code, tell_page, wait_for_page))

    async def wait_closed(self) -> None:
        await self.closed.wait()

    async def _teardown(self, code: str, tell_page: bool, wait_for_page: bool) -> None:
        try:
            if wait_for_page and self.channel is None and self.pc.connectionState in ("new", "connecting", "connected"):
                try:
                    await asyncio.wait_for(self._channel_ready.wait(), 3.0)
                except asyncio.TimeoutError:
                    pass
            if tell_page and self.channel is not None and self.channel.readyState == "open":
                self.channel.send(events.dumps(events.error(
                    f"Call ended: {self.reason}", code=code, type="server_error")))
                await self._drain_channel(0.5)
            current = asyncio.current_task()
            tasks = [t for t in self._tasks if t is not current]
            for task in tasks:
                task.cancel()
            phase = time.monotonic()
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=1.0)
                for task in pending:
                    logger.warning("call %s: task %s still running 1 s after cancel: %s", self.id,
                                   task.get_name(), "".join(f"{f.f_code.co_filename}:{f.f_lineno} " for f in task.get_stack()))
                await asyncio.gather(*tasks, return_exceptions=True)
            phase = self._slow("tasks", phase)
            try:
                await asyncio.wait_for(self.upstream.close(), 2.0)
            except (asyncio.TimeoutError, OSError):
                pass
            phase = self._slow("upstream close", phase)
            self.playback.stop()
            await self.pc.close()
            self._slow("peer close", phase)
            # Break the call's reference cycles (peer ↔ handlers ↔ call) so the
            # codecs and their buffers go now, by refcount, not at the next GC.
            self.pc.remove_all_listeners()
            self.playback.on_started = self.playback.on_stopped = None
            if self.channel is not None:
                self.channel.remove_all_listeners()
        finally:
            mic = self.mic.stats if self.mic else None
            pb = self.playback.stats
            rb = self.receive_buffer.stats if self.receive_buffer else None
            logger.info(
                "call %s ended after %.1f s: %s | mic frames=%d lost=%d concealed=%.0fms reordered=%d late=%d | "
                "out frames=%d audio=%d late=%d reanchors=%d | upstream sent=%d received=%d",
                self.id, time.monotonic() - self.created_at, self.reason,
                mic.frames if mic else 0, mic.lost_frames if mic else 0, mic.concealed_ms if mic else 0,
                rb.recovered if rb else 0, rb.late if rb else 0,
                pb.frames, pb.audio_frames, pb.late_frames, pb.reanchors,
                self.upstream.sent_events, self.upstream.received_events,
            )
            self.closed.set()
            if self._on_closed:
                self._on_closed(self)

    def _slow(self, what: str, since: float) -> float:
        now = time.monotonic()
        if now - since > 1.0:
            logger.warning("call %s: teardown step '%s' took %.1f s", self.id, what, now - since)
        return now

    async def _drain_channel(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.channel and self.channel.bufferedAmount > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # let SCTP put the last chunk on the wire

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=f"call-{self.id}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        if isinstance(exc, UpstreamError):
            self.end(str(exc), code=ErrorCode.UPSTREAM_CLOSED, wait_for_page=True)
        elif isinstance(exc, (MicTimeout, CallEnded)):
            self.end(str(exc))
        else:
            logger.error("call %s: task %s failed", self.id, task.get_name(), exc_info=exc)
            self.end(f"internal error in {task.get_name().rsplit('-', 1)[-1]}: {type(exc).__name__}",
                     code=ErrorCode.UPSTREAM_ERROR)

    # -- peer events ---------------------------------------------------------------

    def _on_track(self, track) -> None:
        if track.kind != "audio" or self.mic is not None:
            return
        if self.settings.jitter_buffer == "reorder":
            receiver = next(t.receiver for t in self.pc.getTransceivers() if t.receiver.track is track)
            self.receive_buffer = jitter.install(receiver, self.settings.reorder_wait_ms // 20)
        # Start reading at once: unread frames pile up in aiortc's unbounded queue.
        self.mic = MicPump(track, self._on_mic_audio, timeout_s=self.settings.media_timeout)
        self._spawn(self._run_mic(), "mic")

    async def _run_mic(self) -> None:
        assert self.mic is not None
        await self.mic.run()
        raise CallEnded("the caller's audio track ended")

    async def _on_mic_audio(self, pcm: bytes) -> None:
        self.upstream.send(events.input_audio_append(pcm))

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != DATA_CHANNEL_LABEL or self.channel is not None:
            logger.info("call %s: ignoring data channel %r", self.id, channel.label)
            return
        self.channel = channel
        channel.on("message", self._on_page_message)
        pending, self._pending_page = self._pending_page, []
        for message in pending:
            channel.send(message)
        self._channel_ready.set()

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected" and self.connected_at is None:
            self.connected_at = time.monotonic()
            logger.info("call %s connected in %.0f ms", self.id, (self.connected_at - self.created_at) * 1000)
        elif state in ("failed", "closed"):
            self.end(f"peer connection {state}")

    async def _watch_connect(self) -> None:
        await asyncio.sleep(self.settings.connect_timeout)
        if self.connected_at is None:
            raise CallEnded(f"ICE/DTLS did not connect within {self.settings.connect_timeout:g} s")

    async def _watch_duration(self) -> None:
        await asyncio.sleep(self.settings.max_call_seconds)
        raise CallEnded(f"call reached the maximum duration of {self.settings.max_call_seconds:g} s")

    # -- page → upstream -----------------------------------------------------------

    def _on_page_message(self, message: str | bytes) -> None:
        verdict = self.policy.check(message)
        for err in verdict.errors:
            self.to_page(err)
        event = verdict.forward
        if event is None:
            return
        if event["type"] == Client.OUTPUT_AUDIO_CLEAR:
            # As OpenAI's WebRTC endpoint: the bridge owns playback, so it clears it.
            self.barge_in()
            return
        self.upstream.send(event)

    def to_page(self, event: Event) -> None:
        message = events.dumps(event)
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(message)
        elif self.channel is None and len(self._pending_page) < MAX_PENDING_PAGE_EVENTS:
            self._pending_page.append(message)

    # -- upstream → page / playback ------------------------------------------------

    async def _read_upstream(self) -> None:
        async for event in self.upstream.read():
            self.on_upstream_event(event)

    def on_upstream_event(self, event: Event) -> None:
        kind = event.get("type")
        if kind == Server.OUTPUT_AUDIO_DELTA:
            self._on_audio_delta(event)
            return  # audio travels on RTP, never on the channel
        if kind == Server.RESPONSE_CREATED:
            self.active_response = (event.get("response") or {}).get("id")
        elif kind == Server.RESPONSE_DONE:
            rid = (event.get("response") or {}).get("id")
            if rid == self.active_response:
                self.active_response = None
            self.playback.end_of_audio()
        elif kind == Server.SPEECH_STARTED:
            if self.interrupt_response:
                self.barge_in()
        elif kind in (Server.SESSION_CREATED, Server.SESSION_UPDATED):
            self._note_session(event.get("session") or {})
        elif kind == Server.ERROR:
            err = event.get("error") or {}
            logger.warning("call %s: upstream error %s: %s", self.id, err.get("code"), err.get("message"))
        self.to_page(event)

    def _note_session(self, session: dict[str, Any]) -> None:
        turn = ((session.get("audio") or {}).get("input") or {}).get("turn_detection", session.get("turn_detection"))
        if isinstance(turn, dict):
            self.interrupt_response = turn.get("interrupt_response", True) is not False
        elif turn is None and "audio" in session:
            self.interrupt_response = False  # client-committed turns: the page decides

    def _on_audio_delta(self, event: Event) -> None:
        item_id = event.get("item_id") or "unknown"
        rid = event.get("response_id")
        if item_id in self._cut_items or (rid is not None and rid in self._cut_responses):
            return  # the user interrupted this response: its late audio is stale
        self._item_response[item_id] = rid
        self.playback.enqueue(item_id, events.decode_audio_delta(event))

    def barge_in(self) -> None:
        """Stop playback now and tell the upstream exactly how much of each item was played."""
        cut = self.playback.flush()
        if self.active_response:
            self._cut_responses.add(self.active_response)
        response_ids = []
        for playout in cut:
            self._cut_items.add(playout.item_id)
            self.upstream.send(events.truncate(playout.item_id, playout.audio_end_ms))
            rid = self._item_response.get(playout.item_id)
            if rid not in response_ids:
                response_ids.append(rid)
            self.playback.forget(playout.item_id)
        for rid in response_ids:
            self.to_page(events.output_audio_buffer(Server.OUTPUT_AUDIO_CLEARED, rid))

    def _on_playback_started(self, item_id: str) -> None:
        rid = self._item_response.get(item_id)
        key = rid or item_id
        if key not in self._started_responses:
            self._started_responses.add(key)
            self.to_page(events.output_audio_buffer(Server.OUTPUT_AUDIO_STARTED, rid))

    def _on_playback_stopped(self, item_id: str) -> None:
        rid = self._item_response.get(item_id)
        self.to_page(events.output_audio_buffer(Server.OUTPUT_AUDIO_STOPPED, rid))
        for item, r in list(self._item_response.items()):
            if r == rid:
                self.playback.forget(item)
