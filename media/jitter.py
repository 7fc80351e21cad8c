"""A receive buffer for audio that goes to a model, not to a loudspeaker.

aiortc's audio JitterBuffer (capacity 16, prefetch 4) is built for playout: it
holds 4 packets (80 ms) before releasing any, and a single missing packet stalls
output until 16 packets have piled up, after which the extra delay stays for the
rest of the call (aiortc issue #543). Measured here: uplink 82 ms with no loss,
≈280 ms for good after the first loss, markers lost at 2 % loss.

A model has no playout clock to protect, so this buffer releases every packet
the moment it is in order, waits at most `max_wait` packets' worth of later
arrivals for a missing one (reordering), then gives the hole up; a packet that
arrives after its slot was given up is dropped. It does not wait at all when the
packet after the hole already carries the lost audio (RED or in-band FEC: the
`recoverable` check). Holes are filled by the decoder (`media/uplink.py`).
Latency never ratchets.

aiortc's receiver hands its jitter buffer one packet and takes back at most one
frame, for its decoder thread. `install()` takes that slot and hands the packets,
in order, to the call's own decoder on the event loop instead: no thread hop,
no PyAV decoder, no resampler. That reaches into aiortc 1.16's private state,
which is why `install()` checks it and returns None (the caller falls back to
aiortc's own path, with a warning) if it is not there.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpreceiver import RTCRtpReceiver
from aiortc.rtp import RtpPacket

logger = logging.getLogger(__name__)

#: A jump larger than this (in sequence numbers) is a new stream, not loss.
RESYNC_DISTANCE = 1000


@dataclass
class JitterStats:
    released: int = 0
    lost: int = 0  # holes given up
    late: int = 0  # packets that came after their hole was given up (or duplicates)
    recovered: int = 0  # reordered packets that arrived in time to fill a hole
    skipped: int = 0  # holes given up at once: the next packet carried their audio
    #: ms each released packet was held back (waiting for a missing one); recent packets only
    hold_ms: deque = field(default_factory=lambda: deque(maxlen=3000))


def seq_distance(a: int, b: int) -> int:
    """Signed distance from sequence number b to a, with 16-bit wrap-around."""
    d = (a - b) & 0xFFFF
    return d - 0x10000 if d >= 0x8000 else d


class ReorderBuffer:
    """In-order, immediate release; bounded wait for a missing packet."""

    def __init__(self, deliver: Callable[[RtpPacket], None], max_wait: int = 2,
                 recoverable: Optional[Callable[[RtpPacket], bool]] = None) -> None:
        self._deliver = deliver
        self._recoverable = recoverable
        self.max_wait = max_wait
        self._next: Optional[int] = None
        self._held: dict[int, RtpPacket] = {}
        self._arrived: dict[int, float] = {}
        self.stats = JitterStats()

    @property
    def capacity(self) -> int:  # aiortc reads nothing else; kept for its interface
        return self.max_wait + 1

    def add(self, packet: RtpPacket) -> tuple[bool, Optional[JitterFrame]]:
        """aiortc's interface: (send a PLI?, frame to decode). Frames go to `deliver` instead."""
        seq = packet.sequence_number
        if self._next is None:
            self._next = seq
        d = seq_distance(seq, self._next)
        if abs(d) > RESYNC_DISTANCE:
            self._held.clear()
            self._arrived.clear()
            self._next, d = seq, 0
        if d < 0 or seq in self._held:
            self.stats.late += 1
            return False, None
        if d == 0 and self._held:
            self.stats.recovered += 1
        self._held[seq] = packet
        self._arrived[seq] = time.monotonic()
        self._drain()
        return False, None

    def _drain(self) -> None:
        assert self._next is not None
        while self._held:
            packet = self._held.pop(self._next, None)
            if packet is not None:
                arrived = self._arrived.pop(self._next, None)
                if arrived is not None:
                    self.stats.hold_ms.append((time.monotonic() - arrived) * 1000)
                self._deliver(packet)
                self.stats.released += 1
            else:
                distances = [seq_distance(s, self._next) for s in self._held]
                if max(distances) <= self.max_wait:
                    following = self._held[(self._next + min(distances)) & 0xFFFF]
                    if self._recoverable is None or not self._recoverable(following):
                        return  # a later packet may still fill the hole
                    self.stats.skipped += min(distances)
                    self.stats.lost += min(distances)
                    self._next = (self._next + min(distances)) & 0xFFFF
                    continue
                self.stats.lost += 1
            self._next = (self._next + 1) & 0xFFFF


def install(receiver: RTCRtpReceiver, deliver: Callable[[RtpPacket], None], max_wait: int = 2,
            recoverable: Optional[Callable[[RtpPacket], bool]] = None) -> Optional[ReorderBuffer]:
    """Put a ReorderBuffer in an audio receiver, releasing packets to `deliver` instead of
    aiortc's decoder thread. Returns None (nothing changed) if this aiortc does not have
    the internals it needs."""
    try:
        receiver._RTCRtpReceiver__jitter_buffer  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError:
        logger.warning("aiortc's receiver internals differ from 1.16: keeping its own audio path")
        return None
    buffer = ReorderBuffer(deliver, max_wait, recoverable)
    receiver._RTCRtpReceiver__jitter_buffer = buffer  # type: ignore[attr-defined]
    return buffer
