"""The model's audio for the browser: 20 ms of 24 kHz PCM16 mono in, an RTP payload out.

aiortc's own encoder (PyAV libopus, 96 kb/s stereo) codes everything in CELT,
where libopus has no in-band FEC; FFmpeg reads FEC and loss options only when
the encoder opens, and ignores DTX. This packer takes aiortc's encoder slot
instead (`install()`): aiortc's sender calls `pack()` with what `PlaybackTrack`
returns and sends the payload as it is, so the audio goes:

  PlaybackTrack (paced 20 ms PCM) → libopus at 24 kHz mono, VoIP, speech bitrate,
  in-band FEC sized from the browser's loss reports → RED (previous frame
  repeated in front) when the browser negotiated it → RTP

No upsampling (the model speaks 24 kHz), no executor hop (one 20 ms encode is
≈0.1 ms, and ctypes releases the GIL while libopus runs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from aiortc import RTCRtpSender

from . import opus, red
from .audio import REALTIME_RATE
from .negotiate import AudioCodecs

logger = logging.getLogger(__name__)

#: DTX: libopus marks a frame not worth sending by coding it in 1-2 bytes.
DTX_MAX_BYTES = 2
#: Expected-loss steps FEC is sized for (libopus takes any 0-100; steps avoid churn).
LOSS_STEPS = (0, 2, 5, 10, 15, 20, 30, 40, 50)


@dataclass
class PcmFrame:
    """20 ms of PCM16 mono at the Realtime rate, with its RTP timestamp (48 kHz units)."""

    pcm: bytes
    pts: int
    time_base: object = field(default=None, repr=False)


@dataclass
class DownlinkStats:
    packets: int = 0
    bytes: int = 0
    red_packets: int = 0
    fec_packets: int = 0  # packets carrying LBRR for the frame before
    dtx_skipped: int = 0
    loss_percent: int = 0  # what FEC is sized for now (from the browser's RTCP reports)
    browser_fraction_lost: float = 0.0  # last receiver report, 0..1
    browser_packets_lost: int = 0

    def as_dict(self) -> dict:
        return {"packets": self.packets, "bytes": self.bytes, "red_packets": self.red_packets,
                "fec_packets": self.fec_packets, "dtx_skipped": self.dtx_skipped, "fec_loss_percent": self.loss_percent,
                "browser_fraction_lost": round(self.browser_fraction_lost, 4),
                "browser_packets_lost": self.browser_packets_lost}


def loss_step(fraction: float) -> int:
    """The FEC target for a reported loss fraction: the smallest step at or above it, with
    a floor of 2 % so a first loss burst finds FEC already on."""
    percent = fraction * 100
    return next((s for s in LOSS_STEPS if s >= percent), LOSS_STEPS[-1]) or LOSS_STEPS[1]


class OpusPacker:
    """aiortc's encoder slot for one call: `pack(PcmFrame)` → ([payload], rtp timestamp)."""

    def __init__(self, codecs: AudioCodecs, *, bitrate: int = 32000, dtx: str = "off") -> None:
        """`dtx`: "on" (silent frames not sent, but one in 21, as libopus marks them), "off",
        or "auto": on until the first frame of model audio, then off. A browser that starts
        playing out late (Firefox, ≈2 s after connecting here) then finds no backlog of
        silence in its jitter buffer, and later silences keep every frame, so loss
        concealment and the echo guard see the stream they always did."""
        self.codecs = codecs
        self.dtx = dtx in ("on", "auto")
        self._dtx_until_speech = dtx == "auto"
        self.stats = DownlinkStats()
        self.stats.loss_percent = loss_step(0.0)
        self._encoder = opus.Encoder(REALTIME_RATE, 1, bitrate=bitrate, fec=True,
                                     loss_percent=self.stats.loss_percent, dtx=self.dtx)
        self._previous: Optional[tuple[int, bytes]] = None  # (timestamp, opus packet) for RED

    def pack(self, frame: PcmFrame) -> tuple[list[bytes], int]:
        if self._dtx_until_speech and any(frame.pcm):  # the model's first audio (silence is exact zeros)
            self._dtx_until_speech = self.dtx = False
            self._encoder.set_dtx(False)
        packet = self._encoder.encode(frame.pcm)
        if self.dtx and len(packet) <= DTX_MAX_BYTES:
            self.stats.dtx_skipped += 1
            self._previous = None
            return [], frame.pts  # aiortc sends nothing; the timestamp still advances
        payload = packet
        if self.codecs.red_pt is not None:
            earlier = []
            if self._previous is not None:
                ts, data = self._previous
                earlier.append(red.Block(self.codecs.opus_pt, (frame.pts - ts) & 0xFFFFFFFF, data))
            payload = red.build(self.codecs.opus_pt, packet, earlier)
            self.stats.red_packets += 1
            self._previous = (frame.pts, packet)
        self.stats.packets += 1
        self.stats.bytes += len(payload)
        if opus.has_lbrr(packet):
            self.stats.fec_packets += 1
        return [payload], frame.pts

    def encode(self, frame, force_keyframe: bool = False):  # aiortc's other entry: never used here
        raise TypeError("OpusPacker packs PcmFrame objects; the track must not return av frames")

    def on_receiver_report(self, fraction_lost: float, packets_lost: int) -> None:
        """The browser's RTCP receiver report on our stream: resize FEC if the loss changed."""
        self.stats.browser_fraction_lost = fraction_lost
        self.stats.browser_packets_lost = packets_lost
        target = loss_step(fraction_lost)
        if target != self.stats.loss_percent:
            self._encoder.set_loss_percent(target)
            self.stats.loss_percent = target

    def close(self) -> None:
        self._encoder.close()


def install(sender: RTCRtpSender, packer: OpusPacker) -> bool:
    """Put the packer in aiortc's encoder slot (before the sender starts). False if this
    aiortc does not have that slot."""
    if not hasattr(sender, "_RTCRtpSender__encoder"):
        logger.warning("aiortc's sender internals differ from 1.16: keeping its own encoder")
        return False
    sender._RTCRtpSender__encoder = packer  # type: ignore[attr-defined]
    return True


async def poll_receiver_reports(sender: RTCRtpSender, packer: OpusPacker) -> None:
    """Feed the browser's latest receiver report to the packer (public getStats, once a
    second; aiortc keeps the latest report of each kind)."""
    stats = await sender.getStats()
    for report in stats.values():
        if report.type == "remote-inbound-rtp":
            packer.on_receiver_report(report.fractionLost / 256.0, report.packetsLost)
