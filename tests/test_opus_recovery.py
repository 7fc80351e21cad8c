"""Unit: every way a lost uplink packet is rebuilt, on real Opus packets of real speech.

Speech (espeak-ng) is encoded the way a browser does once our answer asks for
in-band FEC (libopus, 20 ms, FEC on, loss expected), wrapped in RTP (and RED, as
Chrome sends it), packets are dropped, and what `UplinkDecoder` produces for the
lost frame is compared with the lossless decode of the same packets.
"""

from __future__ import annotations

import numpy as np
import pytest
from aiortc.rtp import RtpPacket

from media import opus, red
from media.audio import FRAME_BYTES, FRAME_SAMPLES, REALTIME_RATE
from media.downlink import OpusPacker, PcmFrame, loss_step
from media.jitter import ReorderBuffer
from media.negotiate import AudioCodecs
from media.uplink import UplinkDecoder
from harness.speech import read_pcm, speech_wav

OPUS_PT, RED_PT = 111, 63
TICKS = 960  # one 20 ms packet in 48 kHz RTP units


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> bytes:
    path = speech_wav("The quick brown fox jumps over the lazy dog, and then it runs far away.",
                      tmp_path_factory.mktemp("speech") / "s.wav", rate=REALTIME_RATE, pad_s=0.0)
    pcm, _ = read_pcm(path)
    return pcm[: len(pcm) - len(pcm) % FRAME_BYTES]


def encode(pcm: bytes, *, fec: bool = True) -> list[bytes]:
    enc = opus.Encoder(REALTIME_RATE, 1, bitrate=32000, fec=fec, loss_percent=20 if fec else 0)
    return [enc.encode(pcm[i:i + FRAME_BYTES]) for i in range(0, len(pcm), FRAME_BYTES)]


def rtp(seq: int, payload: bytes, pt: int = OPUS_PT, ts0: int = 0xFFFFF000) -> RtpPacket:
    # timestamps start just below 2**32: every stream here wraps around
    return RtpPacket(payload_type=pt, sequence_number=seq & 0xFFFF, timestamp=(ts0 + seq * TICKS) & 0xFFFFFFFF,
                     payload=payload)


def red_stream(frames: list[bytes]) -> list[RtpPacket]:
    """Chrome's RED: each packet carries the previous frame in front of its own."""
    out = []
    for i, frame in enumerate(frames):
        earlier = [red.Block(OPUS_PT, TICKS, frames[i - 1])] if i else []
        out.append(rtp(i, red.build(OPUS_PT, frame, earlier), RED_PT))
    return out


def decode(packets: list[RtpPacket], drop: set[int] = frozenset(), red_pt=None) -> tuple[np.ndarray, UplinkDecoder]:
    out = bytearray()
    dec = UplinkDecoder(out.extend, OPUS_PT, red_pt)
    for i, p in enumerate(packets):
        if i not in drop:
            dec.push(p)
    return np.frombuffer(bytes(out), dtype="<i2").astype(np.float64), dec


def frame_of(x: np.ndarray, i: int) -> np.ndarray:
    return x[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES]


def snr_db(reference: np.ndarray, got: np.ndarray) -> float:
    noise = np.sum((reference - got) ** 2)
    return 10 * np.log10(np.sum(reference ** 2) / max(noise, 1e-9))


def spectral_match(reference: np.ndarray, got: np.ndarray) -> float:
    """Cosine similarity of the two frames' magnitude spectra (1: the same sound)."""
    a, b = (np.abs(np.fft.rfft(x * np.hanning(x.size))) for x in (reference, got))
    return float(np.dot(a, b) / max(1e-9, np.linalg.norm(a) * np.linalg.norm(b)))


def voiced_frames(clean: np.ndarray, n: int, start: int = 5) -> list[int]:
    """Loud frames (speech, not pauses) whose neighbours are loud too, spread over the clip."""
    level = [np.sqrt(np.mean(frame_of(clean, i) ** 2)) for i in range(n)]
    loud = [i for i in range(start, n - 2) if min(level[i - 1:i + 2]) > 1500]
    return loud[:: max(1, len(loud) // 6)][:6]


def test_red_block_rebuilds_a_lost_frame_exactly(speech):
    frames = encode(speech)
    packets = red_stream(frames)
    clean, _ = decode(packets, red_pt=RED_PT)
    lost = voiced_frames(clean, len(frames))
    got, dec = decode(packets, drop=set(lost), red_pt=RED_PT)
    assert dec.stats.red_recovered == len(lost) and dec.stats.fec_recovered == dec.stats.concealed == 0
    assert got.size == clean.size  # the timeline is whole
    assert np.array_equal(got, clean)  # the same packets decoded in the same order: bit-exact


def test_in_band_fec_of_the_next_packet_rebuilds_a_lost_frame_far_better_than_silence_or_concealment(speech):
    frames = encode(speech)
    packets = [rtp(i, f) for i, f in enumerate(frames)]
    clean, _ = decode(packets)
    lost = [i for i in voiced_frames(clean, len(frames)) if opus.has_lbrr(frames[i + 1])]
    assert len(lost) >= 3
    got, dec = decode(packets, drop=set(lost))
    assert dec.stats.fec_recovered == len(lost) and dec.stats.concealed == 0
    plc, _ = decode([rtp(i, f) for i, f in enumerate(encode(speech, fec=False))], drop=set(lost))
    clean_nofec, _ = decode([rtp(i, f) for i, f in enumerate(encode(speech, fec=False))])
    for i in lost:
        ref = frame_of(clean, i)
        fec_snr = snr_db(ref, frame_of(got, i))
        assert fec_snr > snr_db(ref, np.zeros_like(ref)) + 6, (i, fec_snr)  # zeros score 0 dB
        assert fec_snr > snr_db(frame_of(clean_nofec, i), frame_of(plc, i)), i  # FEC beats PLC
    assert got.size == clean.size


def test_without_red_or_fec_a_lost_frame_is_concealed_never_zeros(speech):
    frames = encode(speech, fec=False)
    packets = [rtp(i, f) for i, f in enumerate(frames)]
    clean, _ = decode(packets)
    lost = voiced_frames(clean, len(frames))
    got, dec = decode(packets, drop=set(lost))
    assert dec.stats.concealed == len(lost) and dec.stats.red_recovered == dec.stats.fec_recovered == 0
    for i in lost:
        ref, rebuilt = frame_of(clean, i), frame_of(got, i)
        assert np.sqrt(np.mean(rebuilt ** 2)) > 0.1 * np.sqrt(np.mean(ref ** 2))  # sound, not silence
    # Concealment continues the voice but not its phase (waveform SNR is near 0 dB), so it is
    # judged as a listener would: its spectrum is the lost frame's (silence would score 0).
    assert np.median([spectral_match(frame_of(clean, i), frame_of(got, i)) for i in lost]) > 0.6
    assert got.size == clean.size


def test_two_lost_in_a_row_take_red_for_the_second_and_fec_inside_that_red_block_for_the_first(speech):
    frames = encode(speech)
    packets = red_stream(frames)
    clean, _ = decode(packets, red_pt=RED_PT)
    start = next(i for i in voiced_frames(clean, len(frames)) if opus.has_lbrr(frames[i + 1]))
    got, dec = decode(packets, drop={start, start + 1}, red_pt=RED_PT)
    assert (dec.stats.fec_recovered, dec.stats.red_recovered, dec.stats.concealed) == (1, 1, 0)
    # the RED copy is the sent packet itself; the decoder state after FEC differs a little
    assert snr_db(frame_of(clean, start + 1), frame_of(got, start + 1)) > 10
    assert snr_db(frame_of(clean, start), frame_of(got, start)) > 6


def test_a_hole_the_next_packet_can_rebuild_is_released_at_once_not_after_the_reorder_wait(speech):
    frames = encode(speech)
    out: list[int] = []
    dec = UplinkDecoder(lambda pcm: out.append(len(pcm)), OPUS_PT, RED_PT)
    buffer = ReorderBuffer(dec.push, max_wait=2, recoverable=dec.recoverable)
    packets = red_stream(frames)
    for p in packets[:10]:
        buffer.add(p)
    buffer.add(packets[11])  # 10 is lost; 11 carries it as RED
    assert len(out) == 11 and out[-1] == 2 * FRAME_BYTES  # 10 (rebuilt) and 11, with no wait
    assert buffer.stats.skipped == 1 and dec.stats.red_recovered == 1
    buffer.add(packets[10])  # the original turns up late: dropped, audio not doubled
    assert buffer.stats.late == 1 and len(out) == 11


def test_a_hole_only_concealment_can_fill_still_waits_for_a_reordered_packet():
    frames = [bytes([0x08]) + bytes(10)] * 20  # SILK-less packets: no LBRR, plain Opus
    out: list[int] = []
    dec = UplinkDecoder(lambda pcm: out.append(len(pcm)), OPUS_PT, None)
    buffer = ReorderBuffer(dec.push, max_wait=2, recoverable=dec.recoverable)
    for i in (0, 1, 3):
        buffer.add(rtp(i, frames[i]))
    assert len(out) == 2  # 3 waits: 2 may still come
    buffer.add(rtp(2, frames[2]))
    assert len(out) == 4 and dec.stats.concealed == 0 and buffer.stats.recovered == 1


def test_a_pause_longer_than_a_second_is_not_filled(speech):
    frames = encode(speech)
    packets = [rtp(i, f) for i, f in enumerate(frames)]
    got, dec = decode(packets[:5] + packets[80:])
    assert dec.stats.unfilled == 75 and dec.stats.concealed == 0
    assert got.size == (5 + len(frames) - 80) * FRAME_SAMPLES


def test_our_downlink_packets_carry_fec_after_loss_is_reported_and_red_repeats_the_previous_frame(speech):
    packer = OpusPacker(AudioCodecs(OPUS_PT, RED_PT), bitrate=32000)
    packer.on_receiver_report(26 / 256, 40)  # the browser reports ≈10 % loss
    assert packer.stats.loss_percent == loss_step(26 / 256) == 15
    payloads = []
    for n, i in enumerate(range(0, len(speech), FRAME_BYTES)):
        (payload,), ts = packer.pack(PcmFrame(speech[i:i + FRAME_BYTES], n * TICKS))
        assert ts == n * TICKS
        payloads.append(payload)
    blocks = [red.parse(p) for p in payloads]
    assert len(blocks[0]) == 1 and all(len(b) == 2 for b in blocks[1:])
    assert all(b[0].data == prev[-1].data and b[0].offset == TICKS for prev, b in zip(blocks, blocks[1:]))
    assert packer.stats.fec_packets > len(payloads) // 3
    # the browser's decoder gets the same speech back: decode the primaries at 24 kHz
    dec = opus.Decoder(REALTIME_RATE)
    pcm = b"".join(dec.decode(b[-1].data) for b in blocks)
    x = np.frombuffer(pcm, "<i2").astype(float)
    ref = np.frombuffer(speech, "<i2").astype(float)
    n = x.size - FRAME_SAMPLES
    lag = max(range(FRAME_SAMPLES), key=lambda d: float(np.dot(x[d:d + n], ref[:n])))
    assert lag < 240  # the codec delay is a few ms
    assert snr_db(ref[:n], x[lag:lag + n]) > 5


def test_dtx_sends_nothing_for_silence_and_keeps_the_timestamps():
    packer = OpusPacker(AudioCodecs(OPUS_PT, None), dtx="on")
    sent = [packer.pack(PcmFrame(bytes(FRAME_BYTES), n * TICKS)) for n in range(100)]
    assert sum(1 for payloads, _ in sent if payloads) < 20
    assert [ts for _, ts in sent] == [n * TICKS for n in range(100)]


def test_red_payloads_round_trip_and_malformed_ones_are_refused():
    payload = red.build(111, b"primary", [red.Block(111, 1920, b"two"), red.Block(111, 960, b"one")])
    assert [(b.offset, b.data) for b in red.parse(payload)] == [(1920, b"two"), (960, b"one"), (0, b"primary")]
    for bad in (b"", b"\x80\x00", bytes([0xEF, 0x00, 0x3C, 0x10])):
        with pytest.raises(red.RedError):
            red.parse(bad)
