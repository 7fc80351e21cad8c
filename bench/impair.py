"""An application-level network impairment for aiortc peers (this kernel has no netem).

It wraps one peer's ICE connection, so it acts on that peer's packets in both
directions: random or bursty (Gilbert–Elliott) loss, delay with jitter, and a
little reordering. Only RTP/RTCP is touched (first byte 128–191): STUN, DTLS
and the SCTP data channel pass untouched, so calls still set up.

    imp = Impairment(loss=0.05, burst=3, jitter_ms=30, reorder=0.01, seed=1)
    imp.attach(pc)       # after setRemoteDescription, once ICE objects exist

Reusable by tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field


@dataclass
class ImpairStats:
    sent: int = 0  # RTP and RTCP
    dropped: int = 0
    rtp_dropped: int = 0  # media packets only (RTCP excluded)
    reordered: int = 0


@dataclass
class Impairment:
    loss: float = 0.0  # long-run loss rate, 0..1
    burst: float = 1.0  # mean burst length in packets (1 = independent random loss)
    jitter_ms: float = 0.0  # delay varies within base ± jitter, smoothly (a random walk)
    base_delay_ms: float = 0.0
    reorder: float = 0.0  # fraction of packets held back behind the next ones
    seed: int = 0
    up: ImpairStats = field(default_factory=ImpairStats)
    down: ImpairStats = field(default_factory=ImpairStats)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        # Gilbert–Elliott: in Bad every packet is lost; r = 1/mean burst; p chosen for the long-run rate.
        self._r = 1.0 / max(1.0, self.burst)
        self._p = self.loss * self._r / (1.0 - self.loss) if self.loss < 1 else 1.0
        self._bad = {"up": False, "down": False}
        self._walk = {"up": 0.0, "down": 0.0}
        self._last_due = {"up": 0.0, "down": 0.0}

    def _lost(self, way: str) -> bool:
        if self.loss <= 0:
            return False
        if self.burst <= 1.0:
            return self._rng.random() < self.loss
        bad = self._bad[way]
        bad = (self._rng.random() >= self._r) if bad else (self._rng.random() < self._p)
        self._bad[way] = bad
        return bad

    def _delay(self, way: str, loop: asyncio.AbstractEventLoop) -> float:
        """Seconds to hold this packet; keeps order except for the `reorder` fraction."""
        j = self.jitter_ms
        if j:
            w = self._walk[way] + self._rng.uniform(-j / 4, j / 4)
            self._walk[way] = max(-j, min(j, w))
        delay = max(0.0, self.base_delay_ms + j + self._walk[way]) / 1000  # base + jitter in [0, 2j]
        now = loop.time()
        due = max(now + delay, self._last_due[way])  # FIFO...
        if self.reorder and self._rng.random() < self.reorder:
            (self.up if way == "up" else self.down).reordered += 1
            return due - now + 0.045  # ...except this one, which lands behind the next two
        self._last_due[way] = due
        return due - now

    def _admit(self, way: str, data: bytes) -> bool:
        stats = self.up if way == "up" else self.down
        if not data or not 128 <= data[0] <= 191:
            return True  # not RTP/RTCP
        stats.sent += 1
        if self._lost(way):
            stats.dropped += 1
            if len(data) > 1 and not 64 <= (data[1] & 0x7F) <= 95:  # RFC 5761: 64–95 is RTCP
                stats.rtp_dropped += 1
            return False
        return True

    def attach(self, pc) -> None:
        loop = asyncio.get_running_loop()
        seen: set[int] = set()
        for transceiver in pc.getTransceivers():
            ice = transceiver.sender.transport.transport
            if id(ice) in seen:  # BUNDLE: one transport for every transceiver
                continue
            seen.add(id(ice))
            connection = ice._connection
            send, deliver = ice._send, connection.data_received

            async def impaired_send(data: bytes, _send=send) -> None:
                if not self._admit("up", data):
                    return
                if not 128 <= data[0] <= 191:
                    await _send(data)
                    return
                delay = self._delay("up", loop)
                if delay <= 0:
                    await _send(data)
                else:
                    loop.call_later(delay, lambda: asyncio.ensure_future(_safe(_send, data)))

            def impaired_deliver(data: bytes, component: int, _deliver=deliver) -> None:
                if not self._admit("down", data):
                    return
                if not 128 <= data[0] <= 191:
                    _deliver(data, component)
                    return
                delay = self._delay("down", loop)
                if delay <= 0:
                    _deliver(data, component)
                else:
                    loop.call_later(delay, _deliver, data, component)

            # aiortc's DTLS/SRTP layer calls ice._send and aioice calls data_received by
            # attribute lookup, so replacing them on these instances impairs every packet.
            ice._send = impaired_send
            connection.data_received = impaired_deliver


async def _safe(send, data: bytes) -> None:
    try:
        await send(data)
    except ConnectionError:
        pass
