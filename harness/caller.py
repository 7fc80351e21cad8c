"""A synthetic caller built on aiortc: it behaves like the browser page on the wire.

It sends real Opus (20 ms frames) from a programmable source (tone or silence or
a PCM buffer), opens the `oai-events` data channel, posts its offer to
`/v1/realtime/calls`, and records what comes back: the decoded model audio (48
kHz mono, with arrival times) and every event on the channel.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from typing import Optional

import aiohttp
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from media.audio import RTP_RATE

FRAME_48K = 960


class PacedSource(MediaStreamTrack):
    """48 kHz mono PCM16, one 20 ms frame per `recv()`, paced on the monotonic clock like a
    microphone. Subclasses say what frame `n` holds."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._n = 0
        self._start: Optional[float] = None

    def samples(self, n: int) -> np.ndarray:
        """The FRAME_48K int16 samples of frame `n`."""
        raise NotImplementedError

    async def wait_for_slot(self) -> None:
        """Sleep until frame `_n` is due (20 ms apart from the first)."""
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            wait = self._start + self._n * 0.02 - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)

    async def recv(self) -> av.AudioFrame:
        await self.wait_for_slot()
        frame = av.AudioFrame.from_ndarray(self.samples(self._n).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RTP_RATE
        frame.time_base = fractions.Fraction(1, RTP_RATE)
        frame.pts = self._n * FRAME_48K
        self._n += 1
        return frame


class SourceTrack(PacedSource):
    """A programmable microphone: queued PCM first, else a tone at `freq`, else silence."""

    def __init__(self) -> None:
        super().__init__()
        self.freq: Optional[float] = None
        self.level = 0.3
        self._queued = bytearray()

    def play(self, pcm48: bytes) -> None:
        self._queued += pcm48

    def samples(self, n: int) -> np.ndarray:
        if self._queued:
            chunk = bytes(self._queued[:FRAME_48K * 2]).ljust(FRAME_48K * 2, b"\0")
            del self._queued[:FRAME_48K * 2]
            return np.frombuffer(chunk, dtype="<i2")
        if self.freq:
            t = (np.arange(FRAME_48K) + n * FRAME_48K) / RTP_RATE
            return (self.level * 32767 * np.sin(2 * np.pi * self.freq * t)).astype("<i2")
        return np.zeros(FRAME_48K, dtype="<i2")


class Caller:
    """`source`: the track to send (default: a programmable `SourceTrack`).
    `keep_audio`: store the decoded model audio; `on_frame(frame, arrival)`: see every decoded frame."""

    def __init__(self, base_url: str, *, source: Optional[MediaStreamTrack] = None, keep_audio: bool = True,
                 on_frame=None) -> None:
        self.base_url = base_url.rstrip("/")
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.source = source or SourceTrack()
        self.keep_audio = keep_audio
        self.on_frame = on_frame
        self.events: list[dict] = []
        self.event_times: list[float] = []
        self.audio = bytearray()  # decoded model audio, 48 kHz mono s16
        self.audio_frames: list[tuple[float, int]] = []  # (arrival monotonic, total bytes after)
        self.call_id: Optional[str] = None
        self.reconnect_secret: Optional[str] = None
        self.answer_headers: dict[str, str] = {}
        self.channel = None
        self.channel_open = asyncio.Event()
        self._reader: Optional[asyncio.Task] = None
        self._event_waiters: list[tuple[str, asyncio.Future]] = []

    async def connect(self, path: str = "/v1/realtime/calls", *, answer_delay: float = 0.0,
                      headers: Optional[dict[str, str]] = None, offer_filter=None) -> None:
        """Offer, and apply the answer (after `answer_delay` s: a peer slow to connect).
        `offer_filter(sdp) -> sdp` changes the offer on its way (a browser's habits)."""
        self.pc.addTrack(self.source)
        self.channel = self.pc.createDataChannel("oai-events")
        self.channel.on("open", self.channel_open.set)
        self.channel.on("message", self._on_message)
        self.pc.on("track", self._on_track)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with aiohttp.ClientSession() as http:
            offer = self.pc.localDescription.sdp
            async with http.post(self.base_url + path, data=offer_filter(offer) if offer_filter else offer,
                                 headers={"Content-Type": "application/sdp", **(headers or {})}) as resp:
                body = await resp.text()
                if resp.status not in (200, 201):  # 200: a re-attach
                    raise RuntimeError(f"offer refused: {resp.status} {body}")
                self.call_id = resp.headers["Location"].rsplit("/", 1)[-1]
                self.answer_headers = dict(resp.headers)
                self.reconnect_secret = resp.headers.get("X-Reconnect-Secret")
        if answer_delay:
            await asyncio.sleep(answer_delay)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))

    def _on_track(self, track) -> None:
        self._reader = asyncio.ensure_future(self._read(track))

    async def _read(self, track) -> None:
        try:
            while True:
                frame = await track.recv()
                now = time.monotonic()
                if self.on_frame is not None:
                    self.on_frame(frame, now)
                if self.keep_audio:
                    pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0].astype("<i2").tobytes()
                    self.audio += pcm
                    self.audio_frames.append((now, len(self.audio)))
        except MediaStreamError:
            pass

    def _on_message(self, message) -> None:
        event = json.loads(message)
        self.events.append(event)
        self.event_times.append(time.monotonic())
        for kind, fut in list(self._event_waiters):
            if event.get("type") == kind and not fut.done():
                fut.set_result(event)
                self._event_waiters.remove((kind, fut))

    def events_of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("type") == kind]

    async def wait_event(self, kind: str, timeout: float = 10.0) -> dict:
        for e in self.events:
            if e.get("type") == kind:
                return e
        return await self.next_event(kind, timeout)

    async def next_event(self, kind: str, timeout: float = 10.0) -> dict:
        fut = asyncio.get_running_loop().create_future()
        self._event_waiters.append((kind, fut))
        return await asyncio.wait_for(fut, timeout)

    def send_event(self, event: dict | str) -> None:
        self.channel.send(event if isinstance(event, str) else json.dumps(event))

    async def hangup(self) -> int:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{self.base_url}/v1/realtime/calls/{self.call_id}/hangup") as resp:
                return resp.status

    async def reattach(self, call_id: str, secret: str) -> None:
        """Offer again for a live call, as a page does after a network change."""
        await self.connect(f"/v1/realtime/calls/{call_id}/reconnect", headers={"Authorization": f"Bearer {secret}"})

    def drop_network(self) -> None:
        """The caller's network goes away: its ICE sockets close without a word to the server
        (no DTLS close, no RTCP BYE), as when a phone leaves Wi-Fi."""
        for transceiver in self.pc.getTransceivers():
            ice = transceiver.sender.transport.transport
            for protocol in getattr(ice._connection, "_protocols", []):  # aioice 0.13
                if protocol.transport is not None:
                    protocol.transport.close()
        if self.pc.sctp is not None:
            ice = self.pc.sctp.transport.transport
            for protocol in getattr(ice._connection, "_protocols", []):
                if protocol.transport is not None:
                    protocol.transport.close()

    async def close(self) -> None:
        if self._reader:
            self._reader.cancel()
        await self.pc.close()
