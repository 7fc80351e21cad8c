"""The caller's audio for the model: RTP packets in sequence order in, 24 kHz PCM16 mono out.

Each call owns one libopus decoder, opened at the Realtime rate (libopus decodes
natively at 24 kHz, so no resampler sits on the uplink). Packets come from the
receive buffer (`media/jitter.py`) in order, with holes where packets were lost.
Every hole is filled, best source first:

1. the RED block (RFC 2198) a later packet carries for it: the exact audio;
2. in-band FEC (LBRR) carried by the packet after it (`decode_fec=1`): a
   lower-bitrate copy of the lost frame;
3. libopus packet-loss concealment: a continuation built from what came before.

Zeros never: a hole is silence only when it is longer than `MAX_CONCEAL_S`
(the caller paused sending, or the network was gone for seconds), and then it
is not filled at all. `recoverable()` tells the receive buffer when the packet
after a hole already carries the lost frames, so it can skip waiting for them.

Timestamps (48 kHz RTP units), not sequence numbers, say how much audio is
missing: a packet may carry 10 to 60 ms.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

from aiortc.rtp import RtpPacket

from . import opus, red
from .audio import FRAME_SAMPLES, REALTIME_RATE, RTP_RATE

logger = logging.getLogger(__name__)

#: A hole longer than this is a pause or an outage, not loss: it is not filled.
MAX_CONCEAL_S = 1.0
_MAX_GAP = int(MAX_CONCEAL_S * RTP_RATE)
#: 48 kHz RTP ticks per sample at the Realtime rate.
_TICKS = RTP_RATE // REALTIME_RATE
#: libopus conceals at most 120 ms per call.
_MAX_PLC_TICKS = 120 * RTP_RATE // 1000


@dataclass
class UplinkStats:
    packets: int = 0  # received and decoded as they were sent
    red_packets: int = 0  # of those, sent as RED with an earlier frame inside
    lbrr_packets: int = 0  # of those, carrying in-band FEC for the frame before
    red_recovered: int = 0  # lost frames rebuilt exactly from a later packet's RED block
    fec_recovered: int = 0  # lost frames rebuilt from the next packet's in-band FEC
    concealed: int = 0  # lost frames made up by libopus concealment (20 ms units)
    unfilled: int = 0  # frames of holes too long to conceal (pauses), left out
    stale: int = 0  # packets older than audio already produced (duplicates, RED-covered)
    undecodable: int = 0  # packets libopus rejected
    samples_out: int = 0

    @property
    def lost(self) -> int:
        return self.red_recovered + self.fec_recovered + self.concealed

    def as_dict(self) -> dict:
        return {"packets": self.packets, "red_packets": self.red_packets, "lbrr_packets": self.lbrr_packets,
                "lost": self.lost, "red_recovered": self.red_recovered,
                "fec_recovered": self.fec_recovered, "concealed": self.concealed, "unfilled": self.unfilled,
                "stale": self.stale, "undecodable": self.undecodable}


def _frames(ticks: int) -> int:
    """20 ms frames in a span of 48 kHz ticks (at least one)."""
    return max(1, round(ticks / (FRAME_SAMPLES * _TICKS)))


def _signed32(d: int) -> int:
    d &= 0xFFFFFFFF
    return d - 0x100000000 if d >= 0x80000000 else d


class UplinkDecoder:
    """One call's uplink decode with loss recovery. `sink` gets PCM16 24 kHz mono bytes."""

    def __init__(self, sink: Callable[[bytes], None], opus_pt: int, red_pt: Optional[int] = None) -> None:
        self._sink = sink
        self.opus_pt = opus_pt
        self.red_pt = red_pt
        self._decoder = opus.Decoder(REALTIME_RATE, 1)
        self._next_ts: Optional[int] = None  # RTP timestamp the next audio starts at
        self.last_packet_at: Optional[float] = None  # monotonic
        self.stats = UplinkStats()

    # -- what a packet carries ----------------------------------------------------------

    def _blocks(self, packet: RtpPacket) -> Optional[tuple[bytes, dict[int, bytes]]]:
        """(primary Opus packet, {timestamp: redundant Opus packet}) or None if not audio for us."""
        pt, payload = packet.payload_type, packet.payload
        if pt == self.opus_pt:
            return payload, {}
        if pt != self.red_pt or self.red_pt is None:
            return None
        try:
            blocks = red.parse(payload)
        except red.RedError:
            return None
        primary = blocks[-1]
        if primary.payload_type != self.opus_pt:
            return None
        earlier = {(packet.timestamp - b.offset) & 0xFFFFFFFF: b.data
                   for b in blocks[:-1] if b.payload_type == self.opus_pt and b.data}
        return primary.data, earlier

    def _plan(self, start: int, ts: int, primary: bytes, earlier: dict[int, bytes]) -> list[tuple[str, int, bytes]]:
        """How to fill [start, ts): steps (kind, ticks, data), kind in red / fec / plc."""
        known = {t: d for t, d in earlier.items() if 0 <= _signed32(t - start) < _signed32(ts - start)}
        known[ts] = primary
        steps: list[tuple[str, int, bytes]] = []
        pos = start
        while _signed32(ts - pos) > 0:
            data = known.get(pos)
            if data is not None and pos != ts:
                ticks = opus.packet_samples(data, RTP_RATE)
                if ticks > 0:
                    steps.append(("red", ticks, data))
                    pos = (pos + ticks) & 0xFFFFFFFF
                    continue
            # the next audio we hold after pos
            nxt = min((t for t in known if _signed32(t - pos) > 0), key=lambda t: _signed32(t - pos))
            span = _signed32(nxt - pos)
            following = known[nxt]
            fec = opus.packet_samples(following, RTP_RATE) if opus.has_lbrr(following) else 0
            if fec > span:
                fec = 0  # the FEC frame would overlap audio we already have
            if span - fec > 0:
                steps.append(("plc", span - fec, b""))
            if fec:
                steps.append(("fec", fec, following))
            pos = nxt
        return steps

    def recoverable(self, packet: RtpPacket) -> bool:
        """True if the audio missing before `packet` can be rebuilt from the packet itself
        (RED blocks and FEC, no concealment): then there is nothing to wait for."""
        if self._next_ts is None:
            return False
        parsed = self._blocks(packet)
        if parsed is None:
            return False
        gap = _signed32(packet.timestamp - self._next_ts)
        if gap <= 0 or gap > _MAX_GAP:
            return False
        steps = self._plan(self._next_ts, packet.timestamp, *parsed)
        return all(kind != "plc" for kind, _, _ in steps)

    # -- decoding -------------------------------------------------------------------------

    def push(self, packet: RtpPacket) -> None:
        """The next packet in sequence order (holes before it are filled first)."""
        self.last_packet_at = time.monotonic()
        parsed = self._blocks(packet)
        if parsed is None:
            return
        primary, earlier = parsed
        ticks = opus.packet_samples(primary, RTP_RATE)
        if ticks <= 0:
            self.stats.undecodable += 1
            return
        ts = packet.timestamp
        out = bytearray()
        if self._next_ts is not None:
            gap = _signed32(ts - self._next_ts)
            if gap < 0:
                self.stats.stale += 1  # its audio was already produced (or rebuilt)
                return
            if gap > _MAX_GAP:
                self.stats.unfilled += _frames(gap)
            elif gap > 0:
                out += self._fill(self._next_ts, ts, primary, earlier)
        try:
            out += self._decoder.decode(primary)
            self.stats.packets += 1
            self.stats.red_packets += 1 if earlier else 0
            self.stats.lbrr_packets += 1 if opus.has_lbrr(primary) else 0
        except opus.OpusError:
            self.stats.undecodable += 1
            out += self._decoder.conceal(ticks // _TICKS)
            self.stats.concealed += _frames(ticks)
        self._next_ts = (ts + ticks) & 0xFFFFFFFF
        self.stats.samples_out += len(out) // 2
        self._sink(bytes(out))

    def _fill(self, start: int, ts: int, primary: bytes, earlier: dict[int, bytes]) -> bytes:
        out = bytearray()
        for kind, ticks, data in self._plan(start, ts, primary, earlier):
            samples = ticks // _TICKS
            try:
                if kind == "red":
                    out += self._decoder.decode(data)
                    self.stats.red_recovered += _frames(ticks)
                elif kind == "fec":
                    out += self._decoder.decode_fec(data, samples)
                    self.stats.fec_recovered += _frames(ticks)
                else:
                    out += self._conceal(samples)
                    self.stats.concealed += _frames(ticks)
            except opus.OpusError:
                out += self._conceal(samples)
                self.stats.concealed += _frames(ticks)
        return bytes(out)

    def _conceal(self, samples: int) -> bytes:
        out = bytearray()
        step = _MAX_PLC_TICKS // _TICKS
        while samples > 0:
            n = min(samples, step)
            # libopus conceals in whole 2.5 ms steps; pad the tail (never happens at 20 ms ptime)
            whole = n - n % (REALTIME_RATE // 400)
            if whole:
                out += self._decoder.conceal(whole)
            out += bytes(2 * (n - whole))
            samples -= n
        return bytes(out)

    def close(self) -> None:
        self._decoder.close()
