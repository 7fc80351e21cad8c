"""Unit: the receive buffer that feeds the model: in order, at once, bounded wait, no ratchet."""

from aiortc.rtp import RtpPacket

from media.jitter import ReorderBuffer, seq_distance


def packet(seq: int) -> RtpPacket:
    p = RtpPacket(payload_type=111, sequence_number=seq & 0xFFFF, timestamp=(seq * 960) & 0xFFFFFFFF)
    p._data = bytes([seq & 0xFF])
    return p


def run(seqs, max_wait=2):
    out = []
    buf = ReorderBuffer(lambda p: out.append(p.sequence_number), max_wait)
    for s in seqs:
        pli, frame = buf.add(packet(s))
        assert pli is False and frame is None  # frames go to the decoder queue, never back to aiortc
    return out, buf


def test_in_order_packets_are_released_the_moment_they_arrive():
    out, buf = run(range(100, 110))
    assert out == list(range(100, 110))
    assert buf.stats.released == 10 and buf.stats.lost == 0


def test_a_reordered_packet_within_the_wait_is_put_back_in_order():
    out, buf = run([1, 2, 4, 3, 5, 6])
    assert out == [1, 2, 3, 4, 5, 6]
    assert buf.stats.recovered == 1 and buf.stats.lost == 0


def test_a_lost_packet_is_given_up_after_the_wait_and_nothing_stays_behind():
    out, buf = run([1, 2, 4, 5])  # 3 never comes
    assert out == [1, 2]  # 4 and 5 wait for 3 (two packets' worth)
    out, buf = run([1, 2, 4, 5, 6])
    assert out == [1, 2, 4, 5, 6]  # the third later arrival gives 3 up: no backlog remains
    assert buf.stats.lost == 1


def test_a_packet_arriving_after_its_hole_was_given_up_is_dropped():
    out, buf = run([1, 2, 4, 5, 6, 3, 7])
    assert out == [1, 2, 4, 5, 6, 7] and buf.stats.late == 1


def test_with_no_wait_every_hole_is_skipped_at_once():
    out, buf = run([1, 3, 2, 4], max_wait=0)
    assert out == [1, 3, 4] and buf.stats.lost == 1 and buf.stats.late == 1


def test_bursty_loss_never_accumulates_delay():
    seqs = [s for s in range(1000) if not (s % 50 in (10, 11, 12) or s % 97 == 5)]
    out, buf = run(seqs)
    assert out == seqs  # everything that arrived, in order
    # at most max_wait packets are ever held: the last two wait for nothing more to come
    assert len(buf._held) <= 2


def test_sequence_numbers_wrap_around():
    out, _ = run([65534, 65535, 0, 2, 1, 3])
    assert out == [65534, 65535, 0, 1, 2, 3]
    assert seq_distance(0, 65535) == 1 and seq_distance(65535, 0) == -1


def test_duplicates_are_dropped_and_a_new_stream_resyncs():
    out, buf = run([10, 11, 11, 12, 30000, 30001])
    assert out == [10, 11, 12, 30000, 30001] and buf.stats.late == 1
