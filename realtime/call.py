"""One call: the aiortc peer, the upstream Realtime session, and everything between.

The `Call` is the single owner of every resource the call makes. Whichever side
ends first (hangup, the page gone, ICE/DTLS failed or closed, no audio, the
upstream closing or failing, the time limit, server shutdown) calls `end()`
with a reason; `end()` is idempotent and tears everything down once: the page is
told why on `oai-events` if the channel is still open, tasks are cancelled, the
socket and the peer are closed, one line is logged.

Data path (the default `AUDIO_PATH=libopus`; `aiortc` keeps aiortc's own codecs):
  caller RTP → ReorderBuffer → UplinkDecoder (libopus @24 kHz, RED → FEC → PLC)
             → input_audio_buffer.append → upstream
  upstream response.output_audio.delta → PlaybackTrack (paced 20 ms PCM)
             → OpusPacker (libopus 24 kHz mono, FEC from the browser's reports, RED) → caller RTP
  upstream other events ↔ oai-events data channel (page → upstream through the policy)
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine, Optional

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import InvalidStateError
from aiortc.rtcdatachannel import RTCDataChannel

from control.records import CallRecord
from media import downlink, ice, jitter, negotiate
from media.downlink import OpusPacker
from media.echo import EchoGuard
from media.mic import MicPump, MicTimeout
from media.playback import PlaybackTrack, Upsampler, pcm_frame
from media.uplink import UplinkDecoder
from settings import Settings

from . import events
from .events import Client, ErrorCode, Event, Server
from .pagefit import fit_for_page
from .policy import ClientEventPolicy
from . import sctpcap
from .conversation import Action, Conversation, Cut, EndOfAudio, FlushPlayback, Forget, Play, ToPage, ToUpstream
from .redaction import redact
from .upstream import RETRYABLE_CLOSE_CODES, UpstreamError, UpstreamSession

logger = logging.getLogger(__name__)
ice.install()

DATA_CHANNEL_LABEL = "oai-events"
#: Events for the page held until its data channel opens.
MAX_PENDING_PAGE_EVENTS = 500
#: An upstream that says nothing (no session.created) this long after connecting has failed.
SESSION_CREATED_TIMEOUT_S = 10.0
#: The page's message limit when its SDP did not say (RFC 8841's default is 64 KiB).
DEFAULT_PAGE_MESSAGE_LIMIT = 65536
#: A call whose peer has not connected this long after the answer gives its upstream session
#: back (a new one opens if the peer connects later, before CONNECT_TIMEOUT): offers that never
#: connect must not hold the model service's sessions.
UPSTREAM_HOLD_S = 5.0
#: Upstream handoffs a call may make, and the least time between two (an upstream that
#: keeps dropping ends the call).
MAX_HANDOFFS = 20
MIN_HANDOFF_INTERVAL_S = 2.0
#: A new upstream session that has not acknowledged the replay by then is used as it is.
REPLAY_TIMEOUT_S = 10.0
#: No packet from the caller this long: its network went away, the call is held (RECONNECT_GRACE).
HOLD_AFTER_S = 2.0


class CallEnded(Exception):
    pass


@dataclass
class _ReplayFilter:
    """What a new upstream session answers to the replay, kept from the page."""

    item_ids: set[str]
    updates: int  # session.updates sent, each answered by a session.updated
    acked: set[str] = field(default_factory=set)
    updates_seen: int = 0
    last_session: Optional[Event] = None
    errors: int = 0

    @property
    def pending(self) -> bool:
        return self.updates_seen < self.updates or len(self.acked) + self.errors < len(self.item_ids)


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
        self._pending_page: list[str] = []
        self._peer_tasks: set[asyncio.Task] = set()  # tasks of the current peer only
        self._closing: set[asyncio.Task] = set()  # replaced peers being closed (awaited at teardown)
        self._new_peer()
        #: Authorises `POST /v1/realtime/calls/{id}/reconnect`; a new one after each re-attach.
        self.secret = secrets.token_urlsafe(24)
        self.held_since: Optional[float] = None  # the peer went away: waiting for a re-attach
        self._held_channel: Optional[RTCDataChannel] = None
        self.reattaches = 0
        self._unheard_ms = 0  # audio played to a caller whose network had gone (cut from truncation)
        self._tasks: set[asyncio.Task] = set()
        self._teardown_task: Optional[asyncio.Task] = None
        self.closed = asyncio.Event()
        self.reason: Optional[str] = None
        self.created_at = time.monotonic()
        self.connected_at: Optional[float] = None
        # the conversation's rules (socket-free); this object carries out what it decides
        self.conversation = Conversation()
        self._session_created = asyncio.Event()
        self._connect_tasks: set[asyncio.Task] = set()  # aiortc's ICE/DTLS start-up tasks
        self._malformed_shapes = 0  # valid JSON, but not the shape its type promises
        self.oversized_page_events = 0
        self._session_updates: list[Event] = []  # every session.update sent upstream, for a new session
        self._replay: Optional[_ReplayFilter] = None  # a new upstream session being given the conversation
        self.handoffs = 0
        self._replayed_ids: set[str] = set()  # their item.added/done from a new session are not news
        self._last_handoff = 0.0
        self._upstream_opened_at = time.monotonic()
        self.upstream_parked = False
        self.on_connected: Optional[Callable[["Call"], None]] = None
        self._upstream_tasks: list[asyncio.Task] = []
        #: what happened, kept after the call (control/records.py)
        self.record = CallRecord(call_id)
        self._flush_cause = "speech"  # why playback is being flushed (for the record)
        self._client_source = "bridge"  # who sent the client event being carried out (for the record)
        #: operator connections onto this call (control/sideband.py): each gets every server event
        self.sidebands: set = set()
        #: the bridge's own tools (control/tools.py), set by the registry
        self.tools = None
        self.session: Optional[dict] = None  # the session as the upstream last described it
        self.recorder = None  # control.recording.Recorder, with RECORD_AUDIO
        self.node_id: Optional[str] = None  # the cluster node holding the call (with REDIS_URL)
        self.observe: Callable[[str, float], None] = lambda what, seconds: None  # metrics' histograms
        self._turn_ended_at: Optional[float] = None  # the caller's last speech_stopped, until the reply's audio
        self._answer_again = False  # a response was cut off by an upstream handoff: ask the new session

    # -- setup ---------------------------------------------------------------------

    def _new_peer(self) -> None:
        """The parts that belong to one peer connection (replaced when the caller re-attaches).
        The playback track is the call's: it moves to the new peer with what it holds."""
        ice = [RTCIceServer(urls=s.urls, username=s.username, credential=s.credential)
               for s in self.settings.ice_servers]
        # An explicit (possibly empty) list: None would mean Google's STUN server.
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=ice))
        if not hasattr(self, "playback"):
            self.playback = PlaybackTrack()
            self.playback.on_started = self._on_playback_started
            self.playback.on_stopped = self._on_playback_stopped
            self.echo = EchoGuard(self.settings.echo_guard, call_id=self.id)
            self.playback.pcm_taps.append(self.echo.reference)
        self.mic: Optional[MicPump] = None  # aiortc's path
        self.uplink: Optional[UplinkDecoder] = None  # our own path
        self.packer: Optional[OpusPacker] = None
        self.receive_buffer: Optional[jitter.ReorderBuffer] = None
        self._remote_track = None
        self.channel: Optional[RTCDataChannel] = None
        self._channel_ready = asyncio.Event()

    async def accept(self, offer_sdp: str) -> str:
        """Apply the browser's offer and return the SDP answer (all candidates included),
        gathered under the operator's ICE policy (port range, public address, interfaces)."""
        with ice.applied(self.settings.ice_policy()):
            return await self._accept(offer_sdp)

    async def _accept(self, offer_sdp: str) -> str:
        pc = self.pc
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", lambda: self._on_connection_state(pc))
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        self._watch_peer_connect()  # before anything awaits: the task it started has not run yet
        if pc.sctp is not None:
            sctpcap.install(pc.sctp, self._on_oversized_page_message, self._on_page_flood, self._on_invalid_page_text)
        # Attach our track to the offered audio transceiver *before* createAnswer,
        # or the answer comes out recvonly.
        pc.addTrack(self.playback)
        if not (self.settings.audio_path == "libopus" and self._own_audio_path(offer_sdp)):
            self._aiortc_audio_path()
        await pc.setLocalDescription(await pc.createAnswer())
        self._watch_peer_connect()
        return pc.localDescription.sdp

    def _watch_peer_connect(self) -> None:
        """aiortc starts ICE+DTLS in a task nobody awaits: when it fails (or the call ends while
        it runs) its exception would surface as 'Task exception was never retrieved'. Find that
        task and own its outcome: a failure ends the call with the reason."""
        for task in asyncio.all_tasks():
            coro = task.get_coro()
            frame = getattr(coro, "cr_frame", None)
            if task not in self._connect_tasks and getattr(coro, "__qualname__", "").endswith("__connect") \
                    and frame is not None and frame.f_locals.get("self") is self.pc:
                self._connect_tasks.add(task)
                task.add_done_callback(self._peer_connect_done)

    def _peer_connect_done(self, task: asyncio.Task) -> None:
        self._connect_tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved: never logged as unretrieved
        if exc is not None and self.reason is None:
            self.end(f"ICE/DTLS set-up failed: {type(exc).__name__}: {exc}")

    def _own_audio_path(self, offer_sdp: str) -> bool:
        """Negotiate FEC/RED and put libopus on both directions (before any packet flows)."""
        transceiver = next((t for t in self.pc.getTransceivers() if t.kind == "audio"), None)
        if transceiver is None or not hasattr(transceiver.sender, "_RTCRtpSender__encoder") \
                or not hasattr(transceiver.receiver, "_RTCRtpReceiver__jitter_buffer"):
            logger.warning("call %s: aiortc internals differ from 1.16: using aiortc's own audio path", self.id)
            return False
        codecs = negotiate.configure(transceiver, offer_sdp, red=self.settings.red,
                                     browser_bitrate=self.settings.browser_opus_bitrate)
        if codecs is None:
            return False
        self.packer = OpusPacker(codecs, bitrate=self.settings.opus_bitrate, dtx=self.settings.opus_dtx)
        downlink.install(transceiver.sender, self.packer)
        self.playback.set_frames(pcm_frame)
        self.uplink = UplinkDecoder(self._send_mic_audio, codecs.opus_pt, codecs.red_pt)
        self.receive_buffer = jitter.install(transceiver.receiver, self.uplink.push,
                                             self.settings.reorder_wait_ms // 20, self.uplink.recoverable)
        logger.info("call %s: audio opus/%d%s, in-band FEC, %d b/s down", self.id, codecs.opus_pt,
                    f" + red/{codecs.red_pt}" if codecs.red_pt is not None else "", self.settings.opus_bitrate)
        return True

    def _aiortc_audio_path(self) -> None:
        self.playback.set_frames(Upsampler())  # aiortc's encoder takes 48 kHz stereo frames
        track = self._remote_track
        if track is None:
            return
        # Start reading at once: unread frames pile up in aiortc's unbounded queue. With a
        # reconnect grace, silence holds the call (`_watch_uplink`) instead of ending it.
        self.mic = MicPump(track, self._on_mic_audio,
                           timeout_s=0.0 if self.settings.reconnect_grace > 0 else self.settings.media_timeout)
        self._spawn(self._run_mic(), "mic", peer=True)

    async def open_upstream(self) -> None:
        """Connect to the Realtime server and configure the session.

        Run alongside `accept()`, so a refusing upstream becomes a precise HTTP
        error instead of a call that connects and then dies.
        """
        started = time.monotonic()
        await self.upstream.connect(events.session_update(self.settings.session_config()))
        self.observe("upstream_connect", time.monotonic() - started)

    def send_setup(self, event: Event) -> None:
        """A session.update that belongs to the call's set-up (the key's or the offer's session):
        sent now, and again to any upstream that replaces this one."""
        self._session_updates.append(event)
        self.upstream.send(event)

    def start(self) -> None:
        """Start pumping upstream events and the call's timers (after `open_upstream`)."""
        self._start_upstream_tasks()
        self._spawn(self._watch_connect(), "connect-timeout")
        self._spawn(self._watch_duration(), "max-duration")
        self._spawn(self._watch_lifetime(), "upstream-lifetime")
        self._spawn(self._watch_uplink(), "media-timeout")
        self._start_peer_tasks()
        self.to_page(self._reconnect_event())

    def _start_peer_tasks(self) -> None:
        if self.packer is not None:
            self._spawn(self._watch_receiver_reports(), "receiver-reports", peer=True)

    def _reconnect_event(self) -> Event:
        """Tells the page how to come back after a network change (the secret is the page's own)."""
        return {"type": "call.reconnect_info", "event_id": events.event_id(), "call_id": self.id,
                "url": f"/v1/realtime/calls/{self.id}/reconnect", "secret": self.secret,
                "grace_seconds": self.settings.reconnect_grace}

    # -- holding and re-attaching ----------------------------------------------------

    def hold(self, why: str) -> None:
        """The caller's network went away: keep the call (and the upstream) for the grace
        period. What was playing is cut at what was played, the response is cancelled (the
        caller hears none of the rest), page events wait for the next peer."""
        if self.held_since is not None or self.reason is not None:
            return
        self.held_since = time.monotonic()
        active = self.conversation.active_response
        last = self._last_audio_at()
        if last is not None:
            # the caller has heard nothing since its network went (about when its packets stopped)
            self._unheard_ms = int(max(0.0, self.held_since - last) * 1000)
        self._flush_cause = "network_lost"
        self.barge_in()
        self.playback.paused = True  # what comes meanwhile (a new response) waits for the caller
        if active:
            self.upstream.send({"type": Client.RESPONSE_CANCEL, "event_id": events.event_id()})
        self._held_channel, self.channel = self.channel, None  # events queue until a peer is back
        logger.info("call %s held (%s): waiting %g s for the caller to re-attach", self.id, why,
                    self.settings.reconnect_grace)

    def _resume(self, how: str) -> None:
        if self.held_since is None:
            return
        held_for = time.monotonic() - self.held_since
        self.held_since = None
        self.playback.paused = False
        if self.channel is None and self._held_channel is not None and self._held_channel.readyState == "open":
            self.channel = self._held_channel  # the same peer came back (a short outage)
            self._flush_pending_page()
        self._held_channel = None
        logger.info("call %s resumed after %.1f s held (%s)", self.id, held_for, how)

    async def reattach(self, offer_sdp: str) -> str:
        """A new peer for this call (`POST .../reconnect`): the answer to its offer. The old
        peer is closed; the conversation, the upstream and the queued page events carry on."""
        if self.reason is not None:
            raise CallEnded(f"the call has ended: {self.reason}")
        self.hold("re-attaching")
        self.held_since = time.monotonic()  # the new peer gets the whole grace to connect
        old_pc, old_codecs, old_channel = self.pc, (self.uplink, self.packer), self._held_channel
        for transceiver in old_pc.getTransceivers():
            transceiver.sender.replaceTrack(None)  # the old sender lets go of the call's playback track
        for task in list(self._peer_tasks):
            task.cancel()
        old_pc.remove_all_listeners()
        if old_channel is not None:
            old_channel.remove_all_listeners()
        self._held_channel = None
        self._new_peer()
        self.secret = secrets.token_urlsafe(24)  # the one just used is stale now
        self.reattaches += 1
        closing = asyncio.get_running_loop().create_task(self._close_peer(old_pc, old_codecs))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        answer = await self.accept(offer_sdp)
        if self.reason is not None:
            raise CallEnded(f"the call has ended: {self.reason}")
        self._start_peer_tasks()
        self.to_page(self._reconnect_event())
        return answer

    async def _close_peer(self, pc: RTCPeerConnection, codecs) -> None:
        try:
            await asyncio.wait_for(pc.close(), 5.0)
        except Exception as exc:  # a half-dead peer: nothing to keep of it
            logger.info("call %s: closing the old peer: %s: %s", self.id, type(exc).__name__, exc)
        for codec in codecs:
            if codec is not None:
                codec.close()

    # -- ending --------------------------------------------------------------------

    def end(self, reason: str, *, code: str = ErrorCode.CALL_ENDED, tell_page: bool = True,
            wait_for_page: bool = False) -> None:
        """End the call once. `wait_for_page`: if the page's channel is not open yet,
        give it a moment to open so the page learns why (for failures early in a call)."""
        if self.reason is not None:
            return
        self.reason = redact(reason)  # reasons can quote the upstream, which can quote the key
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
            if self._closing:
                await asyncio.gather(*self._closing, return_exceptions=True)
            phase = self._slow("tasks", phase)
            try:
                await asyncio.wait_for(self.upstream.close(), 2.0)
            except (asyncio.TimeoutError, OSError):
                pass
            phase = self._slow("upstream close", phase)
            self.playback.stop()
            try:
                await self.pc.close()
            except Exception as exc:  # aiortc can trip over a half-built peer (an odd offer)
                logger.warning("call %s: closing the peer failed: %s: %s", self.id, type(exc).__name__, exc)
            self._slow("peer close", phase)
            for codec in (self.uplink, self.packer):
                if codec is not None:
                    codec.close()
            # Break the call's reference cycles (peer ↔ handlers ↔ call) so the
            # codecs and their buffers go now, by refcount, not at the next GC.
            self.pc.remove_all_listeners()
            self.playback.on_started = self.playback.on_stopped = None
            self.playback.pcm_taps.clear()
            self.echo.close()
            if self.channel is not None:
                self.channel.remove_all_listeners()
        finally:
            pb = self.playback.stats
            logger.info(
                "call %s ended after %.1f s: %s | %s | out frames=%d audio=%d late=%d reanchors=%d%s | "
                "upstream sent=%d received=%d",
                self.id, time.monotonic() - self.created_at, self.reason, self._uplink_summary(),
                pb.frames, pb.audio_frames, pb.late_frames, pb.reanchors, self._downlink_summary(),
                self.upstream.sent_events, self.upstream.received_events,
            )
            self.record.finish(self.reason or "ended", {
                **self.audio_counters(), "playback": {"frames": pb.frames, "audio_frames": pb.audio_frames,
                                                      "late_frames": pb.late_frames, "reanchors": pb.reanchors,
                                                      "max_lateness_ms": round(pb.max_lateness_ms, 1)}},
                handoffs=self.handoffs, reattaches=self.reattaches)
            for sideband in list(self.sidebands):
                sideband.call_ended(self.reason or "ended")
            self.closed.set()
            if self._on_closed:
                self._on_closed(self)

    @property
    def malformed_upstream_events(self) -> int:
        """Upstream events dropped for their shape (or audio that is not base64)."""
        return self._malformed_shapes + self.conversation.malformed_audio

    def audio_counters(self) -> dict[str, dict]:
        """Per-call audio counters for metrics: what came in, what was rebuilt, what went out."""
        rb = self.receive_buffer.stats if self.receive_buffer else None
        up: dict = {}
        if self.uplink is not None:
            up = self.uplink.stats.as_dict()
        elif self.mic is not None:
            up = {"packets": self.mic.stats.frames, "lost": self.mic.stats.lost_frames,
                  "silence_ms": round(self.mic.stats.concealed_ms)}
        if rb is not None:
            up.update(reordered=rb.recovered, late=rb.late, waits_skipped=rb.skipped)
        return {"uplink": up, "downlink": self.packer.stats.as_dict() if self.packer else {},
                "echo": self.echo.stats.as_dict()}

    def _uplink_summary(self) -> str:
        up = self.audio_counters()["uplink"]
        if self.uplink is not None:
            return ("mic packets={packets} lost={lost} red={red_recovered} fec={fec_recovered} "
                    "concealed={concealed} unfilled={unfilled} late={late} reordered={reordered}").format(
                **{"late": 0, "reordered": 0, **up})
        return "mic frames={packets} lost={lost} silence={silence_ms}ms (aiortc path)".format(
            **{"packets": 0, "lost": 0, "silence_ms": 0, **up})

    def _downlink_summary(self) -> str:
        if self.packer is None:
            return ""
        d = self.packer.stats
        return (f" opus={d.packets} red={d.red_packets} fec={d.fec_packets} fec-sized-for={d.loss_percent}% "
                f"browser-loss={d.browser_fraction_lost:.1%} ({d.browser_packets_lost} packets)")

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

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str, *, peer: bool = False) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=f"call-{self.id}-{name}")
        self._tasks.add(task)
        if peer:
            self._peer_tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._peer_tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        if isinstance(exc, UpstreamError):
            if task in self._upstream_tasks and self._may_hand_off(exc):
                self._spawn(self._hand_off(str(exc), planned=False), "upstream-handoff")
                return
            self.end(str(exc), code=ErrorCode.UPSTREAM_CLOSED, wait_for_page=True)
        elif isinstance(exc, (MicTimeout, CallEnded)):
            self.end(str(exc))
        else:
            logger.error("call %s: task %s failed", self.id, task.get_name(), exc_info=exc)
            self.end(f"internal error in {task.get_name().rsplit('-', 1)[-1]}: {type(exc).__name__}",
                     code=ErrorCode.UPSTREAM_ERROR)

    # -- peer events ---------------------------------------------------------------

    def _on_track(self, track) -> None:
        # Fires inside setRemoteDescription; accept() picks the audio path right after,
        # before ICE starts, so no packet can arrive unread.
        if track.kind == "audio" and self._remote_track is None:
            self._remote_track = track

    async def _run_mic(self) -> None:
        assert self.mic is not None
        await self.mic.run()
        raise CallEnded("the caller's audio track ended")

    async def _on_mic_audio(self, pcm: bytes) -> None:
        self._send_mic_audio(pcm)

    def _send_mic_audio(self, pcm: bytes) -> None:
        pcm = self.echo.process(pcm)
        if pcm:
            self.upstream.send(events.input_audio_append(pcm))
            if self.recorder is not None:
                self.recorder.caller(pcm)

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != DATA_CHANNEL_LABEL or self.channel is not None:
            logger.info("call %s: ignoring data channel %r", self.id, channel.label)
            return
        self.channel = channel
        channel.on("message", self._on_page_message)
        if channel.readyState == "open":
            self._flush_pending_page()
        else:  # announced but not open yet: what comes meanwhile waits with the rest
            channel.on("open", self._flush_pending_page)

    def _flush_pending_page(self) -> None:
        assert self.channel is not None
        pending, self._pending_page = self._pending_page, []
        for message in pending:
            try:
                self.channel.send(message)
            except (ValueError, ConnectionError, InvalidStateError) as exc:
                logger.warning("call %s: could not send a held event to the page: %s", self.id, exc)
        self._channel_ready.set()

    def _on_connection_state(self, pc: RTCPeerConnection) -> None:
        if pc is not self.pc:
            return  # a peer this call has replaced
        state = pc.connectionState
        if state == "connected" and self.reattaches and self.held_since is not None:
            logger.info("call %s: re-attached peer connected", self.id)
        elif state == "failed" and self.settings.reconnect_grace > 0 and self.connected_at is not None:
            self.hold("peer connection failed")
            return
        if state == "connected" and self.connected_at is None:
            self.connected_at = time.monotonic()
            self.record.connected()
            logger.info("call %s connected in %.0f ms", self.id, (self.connected_at - self.created_at) * 1000)
            if self.upstream_parked and self.reason is None:
                self._spawn(self._resume_upstream(), "upstream-resume")
            if self.on_connected is not None:
                self.on_connected(self)
        elif state in ("failed", "closed"):
            self.end(f"peer connection {state}")

    # -- upstream handoff ------------------------------------------------------------

    def _may_hand_off(self, exc: UpstreamError) -> bool:
        return (exc.close_code in RETRYABLE_CLOSE_CODES and self.reason is None and self._replay is None
                and self.handoffs < MAX_HANDOFFS and time.monotonic() - self._last_handoff > MIN_HANDOFF_INTERVAL_S)

    async def _hand_off(self, why: str, *, planned: bool) -> None:
        """Move the call to a new upstream session: the same configuration, then the
        conversation so far as items; the page sees one session.updated and none of the
        replayed items again. Unplanned (the old one is gone): audio queues for the new one
        at once. Planned (before the session's lifetime ends, between turns): the old one
        carries on until the new one is open."""
        self.handoffs += 1
        self._last_handoff = time.monotonic()
        new = self.upstream.fresh()
        for event in self._session_updates:
            new.send(event)
        replayed = self.conversation.replay()
        for event in replayed:
            new.send(event)
        self._replay = _ReplayFilter({e["item"]["id"] for e in replayed}, len(self._session_updates) + 1)
        self._replayed_ids.update(self._replay.item_ids)
        logger.info("call %s: %s; handing over to a new upstream session (%d items replayed)", self.id, why,
                    len(replayed))
        old = self.upstream
        if not planned:
            self._swap_upstream(new)
            self._orphaned_response()
        try:
            await new.connect(events.session_update(self.settings.session_config()))
        except UpstreamError as exc:
            raise CallEnded(f"{why}, and a new upstream session failed: {exc}") from None
        if planned:
            self._swap_upstream(new)
        self._upstream_opened_at = time.monotonic()
        self._start_upstream_tasks()
        self._spawn(self._watch_replay(), "upstream-replay")
        try:
            await asyncio.wait_for(old.close(), 2.0)
        except (asyncio.TimeoutError, OSError):
            pass

    def _orphaned_response(self) -> None:
        """The session that went away was answering: the rest of that answer will never come.
        What is buffered of it is dropped (a new answer follows, and two would overlap), the
        page is told it ended, and once the new session has the conversation it is asked to
        answer again (`_finish_replay`)."""
        rid = self.conversation.active_response
        if rid is None:
            return
        self.conversation.barge_in()  # marks it cut (its late audio, if any, is dropped); no truncate: the item died with its session
        flushed = self.playback.flush()
        if flushed:
            self.to_page(events.output_audio_buffer(Server.OUTPUT_AUDIO_CLEARED, rid))
        self.execute(self.conversation.from_upstream({
            "type": Server.RESPONSE_DONE, "event_id": events.event_id(), "response": {
                "id": rid, "object": "realtime.response", "status": "incomplete", "output": [],
                "status_details": {"type": "incomplete", "reason": "upstream_session_replaced"}}}))
        self._answer_again = True
        logger.info("call %s: response %s was cut off with its upstream session; asking the new one to answer again",
                    self.id, rid)

    def _swap_upstream(self, new: UpstreamSession) -> None:
        for task in self._upstream_tasks:
            task.cancel()
        self._upstream_tasks = []
        self.upstream = new
        self._session_created.clear()

    async def _watch_replay(self) -> None:
        await asyncio.sleep(REPLAY_TIMEOUT_S)
        if self._replay is not None:
            logger.warning("call %s: the new upstream session did not acknowledge the replay in %g s", self.id,
                           REPLAY_TIMEOUT_S)
            self._finish_replay()

    def _filter_replay(self, event: Event) -> bool:
        """True if `event` is the new session's answer to the replay (the page has seen it all)."""
        f = self._replay
        assert f is not None
        kind = event.get("type")
        if kind == Server.SESSION_CREATED:
            return True
        if kind == Server.SESSION_UPDATED:
            f.last_session, f.updates_seen = event, f.updates_seen + 1
        elif kind in (Server.ITEM_ADDED, Server.ITEM_DONE, "conversation.item.created"):
            item_id = (event.get("item") or {}).get("id")
            if item_id not in f.item_ids:
                return False
            f.acked.add(item_id)
        elif kind == Server.ERROR and f.pending:
            err = event.get("error") or {}
            logger.warning("call %s: the new upstream session refused part of the replay: %s", self.id,
                           redact(str(err.get("message"))))
            f.errors += 1
        else:
            return False
        if not f.pending:
            self._finish_replay()
        return True

    def _finish_replay(self) -> None:
        f, self._replay = self._replay, None
        if f is not None and f.last_session is not None:
            self.execute(self.conversation.from_upstream(f.last_session))  # the page's one session.updated
        if self._answer_again:
            self._answer_again = False
            self.send_upstream({"type": Client.RESPONSE_CREATE, "event_id": events.event_id()})

    async def _watch_lifetime(self) -> None:
        """Before the upstream's session limit (OpenAI: 60 minutes), move to a new session
        between turns, never mid-response."""
        lifetime = self.settings.upstream_lifetime()
        if lifetime <= 0:
            return
        while True:
            await asyncio.sleep(max(0.1, self._upstream_opened_at + lifetime - time.monotonic()))
            if time.monotonic() - self._upstream_opened_at < lifetime:
                continue  # a handoff happened meanwhile
            while self.conversation.active_response or self.playback.playing_item or self._replay is not None:
                await asyncio.sleep(0.2)
            await self._hand_off(f"the upstream session reached its {lifetime:g} s lifetime", planned=True)

    def _start_upstream_tasks(self) -> None:
        self._upstream_tasks = [self._spawn(self.upstream.write_loop(), "upstream-writer"),
                                self._spawn(self._read_upstream(), "upstream-reader"),
                                self._spawn(self._watch_session_created(), "session-created")]

    async def _watch_connect(self) -> None:
        timeout = self.settings.connect_timeout
        hold = min(UPSTREAM_HOLD_S, timeout)
        await asyncio.sleep(hold)
        if self.connected_at is None and hold < timeout:
            await self._park_upstream()
            await asyncio.sleep(timeout - hold)
        if self.connected_at is None:
            raise CallEnded(f"ICE/DTLS did not connect within {timeout:g} s")

    async def _park_upstream(self) -> None:
        """Give the upstream session back while the peer has not connected; a fresh one, with
        the set-up events queued, waits to be opened by `_resume_upstream`."""
        self.upstream_parked = True
        for task in self._upstream_tasks:
            task.cancel()
        old, self.upstream = self.upstream, self.upstream.fresh()
        for event in self._session_updates:
            self.upstream.send(event)
        self._session_created.clear()
        # what the old session said (session.created, ...) is not the new one's: the page never saw it
        self._pending_page = [m for m in self._pending_page if events.loads_type(m) == Server.ERROR]
        logger.info("call %s: peer not connected after %g s: upstream session closed until it connects",
                    self.id, UPSTREAM_HOLD_S)
        try:
            await asyncio.wait_for(old.close(), 2.0)
        except (asyncio.TimeoutError, OSError):
            pass

    async def _resume_upstream(self) -> None:
        self.upstream_parked = False
        await self.open_upstream()  # a refusal ends the call with the reason (UpstreamError)
        self._start_upstream_tasks()
        logger.info("call %s: upstream session reopened after the peer connected", self.id)

    def _last_audio_at(self) -> Optional[float]:
        """When the caller's audio last came in (monotonic), on either audio path."""
        if self.uplink is not None:
            return self.uplink.last_packet_at
        return self.mic.last_frame_at if self.mic is not None else None

    async def _watch_uplink(self) -> None:
        """No audio from the caller: with a reconnect grace, the call is held after
        HOLD_AFTER_S and ended when the grace runs out; without one, ended after MEDIA_TIMEOUT
        (on aiortc's path MicPump times out itself then)."""
        grace = self.settings.reconnect_grace
        while True:
            await asyncio.sleep(0.25)
            if self.connected_at is None:
                continue
            now = time.monotonic()
            last = self._last_audio_at()
            if self.held_since is not None:
                if now - self.held_since > grace:
                    raise CallEnded(f"the caller did not re-attach within {grace:g} s of its network going away")
                if last and now - last < 0.5:
                    self._resume("audio flowing again" if not self.reattaches else "re-attached")
                continue
            if self.uplink is None and (self.mic is None or grace <= 0):
                continue
            idle = now - (last or self.connected_at)
            if grace > 0 and idle > HOLD_AFTER_S:
                self.hold(f"no audio from the caller for {HOLD_AFTER_S:g} s")
            elif grace <= 0 and idle > self.settings.media_timeout:
                raise MicTimeout(f"no audio from the caller for {self.settings.media_timeout:g} s")

    async def _watch_receiver_reports(self) -> None:
        """Size the downlink's FEC from the loss the browser reports (RTCP RR, ≈1/s)."""
        assert self.packer is not None
        sender = next(t.sender for t in self.pc.getTransceivers() if t.kind == "audio")
        while True:
            await asyncio.sleep(1.0)
            await downlink.poll_receiver_reports(sender, self.packer)

    async def _watch_session_created(self) -> None:
        try:
            await asyncio.wait_for(self._session_created.wait(), SESSION_CREATED_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise UpstreamError(f"upstream sent no session.created within {SESSION_CREATED_TIMEOUT_S:g} s "
                                "of connecting") from None

    async def _watch_duration(self) -> None:
        await asyncio.sleep(self.settings.max_call_seconds)
        raise CallEnded(f"call reached the maximum duration of {self.settings.max_call_seconds:g} s")

    # -- page → upstream -----------------------------------------------------------

    def _on_page_message(self, message: str | bytes) -> None:
        verdict = self.policy.check(message)  # answers every message: an event to act on, or errors
        for err in verdict.errors:
            self.to_page(err)
        if verdict.forward is not None:
            self.from_client(verdict.forward, "page")

    def from_client(self, event: Event, source: str) -> None:
        """A client event that passed its policy (the page's, or a sideband's operator policy)."""
        if event.get("type") == Client.OUTPUT_AUDIO_CLEAR:
            self._flush_cause = f"{source}_clear"
        self._client_source = source
        try:
            self.execute(self.conversation.from_page(event))
        finally:
            self._client_source = "bridge"

    def execute(self, actions: list[Action]) -> None:
        """Carry out what the conversation core decided, in order."""
        for action in actions:
            if isinstance(action, ToUpstream):
                event = action.event
                if event.get("type") == Client.SESSION_UPDATE:
                    if self.tools is not None:
                        event = self.tools.with_server_tools(event)
                    if len(self._session_updates) < 100:
                        self._session_updates.append(event)
                self.record.client_event(event, self._client_source)
                self.upstream.send(event)
            elif isinstance(action, ToPage):
                self.to_page(action.event)
            elif isinstance(action, Play):
                self.playback.enqueue(action.item_id, action.pcm)
            elif isinstance(action, EndOfAudio):
                self.playback.end_of_audio()
            elif isinstance(action, FlushPlayback):
                playing = self.playback.playing_item
                cut = [Cut(p.item_id, max(0, p.audio_end_ms - (self._unheard_ms if p.item_id == playing else 0)))
                       for p in self.playback.flush()]
                self._unheard_ms = 0
                if cut:
                    self.record.barge_in(self._flush_cause, [(c.item_id, c.audio_end_ms) for c in cut])
                self._flush_cause = "speech"
                self.execute(self.conversation.flushed(cut))
            elif isinstance(action, Forget):
                self.playback.forget(action.item_id)

    def send_upstream(self, event: Event) -> None:
        """An event of the bridge's own (a tool's output, a response.create) for the upstream."""
        self.execute([ToUpstream(event)])

    def spawn_task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task:
        """A task that lives as long as the call (cancelled at its end; a failure ends it)."""
        return self._spawn(coro, name)

    def _on_oversized_page_message(self, size: int) -> None:
        self.to_page(events.error(
            f"A data-channel message of {size} bytes was dropped: the limit is {sctpcap.MAX_MESSAGE_BYTES} "
            "bytes (the answer's max-message-size).", code=ErrorCode.MESSAGE_TOO_LARGE))

    def _on_invalid_page_text(self, exc: UnicodeDecodeError) -> None:
        self.to_page(events.error(
            f"A data-channel text message was dropped: it is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at "
            f"offset {exc.start}: {exc.reason}).", code=ErrorCode.INVALID_UTF8))

    def _on_page_flood(self, held: int) -> None:
        self.end(f"the peer sent {held} bytes of unfinished data-channel messages, past the "
                 f"{sctpcap.RECEIVE_WINDOW_BYTES}-byte receive window", code=ErrorCode.MESSAGE_TOO_LARGE)

    def to_page(self, event: Event) -> None:
        """Send an event to the page: secrets masked, split or cut to the page's message
        limit (never an error that ends the call), held until its channel opens."""
        if event.get("type") != "call.reconnect_info":  # the page's own secret
            for sideband in self.sidebands:
                sideband.event(event)
        limit = self._page_limit()
        message = redact(events.dumps(event))
        messages = [message]
        if len(message.encode()) > limit:
            self.oversized_page_events += 1
            messages = [redact(events.dumps(e)) for e in fit_for_page(event, limit)]
        for message in messages:
            if self.channel is not None and self.channel.readyState == "open":
                try:
                    self.channel.send(message)
                except (ValueError, ConnectionError, InvalidStateError) as exc:  # closing, or still too big
                    logger.warning("call %s: could not send a %d-byte event to the page: %s", self.id,
                                   len(message), exc)
            elif (self.channel is None or self.channel.readyState == "connecting") \
                    and len(self._pending_page) < MAX_PENDING_PAGE_EVENTS:
                self._pending_page.append(message)

    def _page_limit(self) -> int:
        """The largest message the page accepts (its SDP's max-message-size)."""
        transport = getattr(self.channel, "transport", None)
        limit = getattr(transport, "_remote_max_message_size", None)  # aiortc 1.16's SCTP transport
        return limit if isinstance(limit, int) and limit > 0 else DEFAULT_PAGE_MESSAGE_LIMIT

    # -- upstream → page / playback ------------------------------------------------

    async def _read_upstream(self) -> None:
        async for event in self.upstream.read():
            self.on_upstream_event(event)

    def on_upstream_event(self, event: Event) -> None:
        kind = event.get("type")
        if kind in (Server.SESSION_CREATED, Server.SESSION_UPDATED):
            self._session_created.set()
        problem = events.shape_problem(event)
        if problem is not None:
            # Valid JSON, wrong shape (`response` a string, a delta not base64, ...): dropped and
            # counted, never passed on, never fatal.
            self._malformed_shapes += 1
            if self.malformed_upstream_events in (1, 10, 100, 1000):
                logger.warning("call %s: upstream %s event dropped: %s (%d malformed so far)", self.id, kind,
                               problem, self.malformed_upstream_events)
            return
        self.record.upstream_event(event)
        if kind in (Server.SESSION_CREATED, Server.SESSION_UPDATED) and isinstance(event.get("session"), dict):
            self.session = event["session"]
        if kind == Server.OUTPUT_AUDIO_DELTA:
            for sideband in self.sidebands:
                sideband.audio(event)
            if self._turn_ended_at is not None:
                self.observe("response_latency", time.monotonic() - self._turn_ended_at)
                self._turn_ended_at = None
        elif kind == Server.SPEECH_STOPPED:
            self._turn_ended_at = time.monotonic()
        elif kind in (Server.SPEECH_STARTED, Server.RESPONSE_DONE):
            self._turn_ended_at = None  # a new turn, or a reply with no audio: nothing to time
        if self._replay is not None and self._filter_replay(event):
            return
        if kind in (Server.ITEM_ADDED, Server.ITEM_DONE) and (event.get("item") or {}).get("id") in self._replayed_ids:
            return  # a late acknowledgement of the replay
        if kind == Server.ERROR:
            err = event.get("error") or {}
            logger.warning("call %s: upstream error %s: %s", self.id, err.get("code"), redact(str(err.get("message"))))
        if self.tools is not None:
            self.tools.on_upstream_event(event)
        self.execute(self.conversation.from_upstream(event))

    def barge_in(self) -> None:
        """Stop playback now and tell the upstream exactly how much of each item was played."""
        self.execute(self.conversation.barge_in())

    def _on_playback_started(self, item_id: str) -> None:
        self.execute(self.conversation.playback_started(item_id))

    def _on_playback_stopped(self, item_id: str) -> None:
        self.execute(self.conversation.playback_stopped(item_id))
