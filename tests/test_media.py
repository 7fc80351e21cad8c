"""Unit: resampling, loss accounting, outbound framing/pacing/flush, truncation arithmetic."""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest

from media.audio import REALTIME_RATE, dominant_frequency, rms_dbfs, tone
from media.mic import MicPump
from media.resample import StreamResampler
from media.playback import PlaybackTrack, ItemPlayout


def stereo_48k_frames(freq: float, seconds: float, level: float = 0.5, start_pts: int = 0):
    for i in range(int(seconds * 50)):
        t = (np.arange(960) + i * 960) / 48000
        mono = (level * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2")
        frame = av.AudioFrame.from_ndarray(np.repeat(mono, 2).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate = 48000
        frame.time_base = fractions.Fraction(1, 48000)
        frame.pts = start_pts + i * 960
        yield frame


def test_a_440hz_tone_at_48k_stereo_comes_out_440hz_at_24k_mono_at_the_same_level():
    down = StreamResampler(REALTIME_RATE)
    pcm = b"".join(down.frame(f).tobytes() for f in stereo_48k_frames(440, 2.0))
    steady = pcm[REALTIME_RATE:]  # skip the first half second of filter warm-up
    assert abs(dominant_frequency(steady) - 440) < 1.0
    assert abs(rms_dbfs(steady) - rms_dbfs(tone(440, 1000))) < 0.2
    # 2 s in → 2 s out, give or take the resampler's filter delay (< 1 ms)
    assert abs(len(pcm) // 2 - 2 * REALTIME_RATE) <= 24


def test_the_resampler_survives_a_change_of_input_format():
    down = StreamResampler(REALTIME_RATE)
    down.frame(next(stereo_48k_frames(440, 0.02)))
    mono = av.AudioFrame.from_ndarray(np.zeros((1, 320), dtype="<i2"), format="s16", layout="mono")
    mono.sample_rate = 16000
    assert len(down.frame(mono)) > 0


class ListTrack:
    """A source of prepared frames standing in for aiortc's RemoteStreamTrack queue."""

    def __init__(self, frames):
        self.frames = list(frames)

    async def recv(self):
        from aiortc.mediastreams import MediaStreamError

        if not self.frames:
            raise MediaStreamError
        return self.frames.pop(0)


async def test_the_mic_pump_counts_lost_frames_from_pts_gaps_and_fills_them_with_silence():
    frames = list(stereo_48k_frames(440, 1.0))
    del frames[10:13]  # three packets lost
    out = []

    async def sink(pcm):
        out.append(pcm)

    pump = MicPump(ListTrack(frames), sink)
    await pump.run()
    assert pump.stats.lost_frames == 3
    assert pump.stats.concealed_ms == pytest.approx(60, abs=0.5)
    # the timeline is kept: 1 s of caller time → 1 s upstream
    assert abs(sum(len(p) for p in out) // 2 - REALTIME_RATE) <= 24


class FakeClock:
    def __init__(self):
        self.now = 1000.0
        self.sleeps = []

    def __call__(self):
        return self.now

    async def sleep(self, s):
        self.sleeps.append(s)
        self.now += s


def track_with_clock():
    clock = FakeClock()
    return PlaybackTrack(clock=clock, sleep=clock.sleep), clock


def mono24(frame) -> bytes:
    """Back from the 48 kHz stereo frame the encoder gets to 24 kHz mono (left channel, every other sample)."""
    return frame.to_ndarray().reshape(-1, 2)[::2, 0].astype("<i2").tobytes()


async def test_every_frame_is_20ms_48k_stereo_with_continuous_pts_and_silence_when_idle():
    track, _ = track_with_clock()
    frames = [await track.recv() for _ in range(5)]
    assert [f.samples for f in frames] == [960] * 5
    assert [f.pts for f in frames] == [i * 960 for i in range(5)]
    assert all(f.sample_rate == 48000 and f.layout.name == "stereo" and f.time_base == fractions.Fraction(1, 48000)
               for f in frames)
    assert all(not f.to_ndarray().any() for f in frames)


async def test_model_audio_reaches_the_encoder_at_the_same_frequency_and_level_without_delay():
    track, _ = track_with_clock()
    track.enqueue("item_a", tone(1000, 1000))
    frames = [await track.recv() for _ in range(50)]
    stereo = np.concatenate([f.to_ndarray().reshape(-1, 2) for f in frames])
    assert (stereo[:, 0] == stereo[:, 1]).all()
    left = stereo[:, 0].astype("<i2").tobytes()
    assert abs(dominant_frequency(left[9600:], 48000) - 1000) < 1
    assert abs(rms_dbfs(left[9600:]) - rms_dbfs(tone(1000, 500))) < 0.2  # no -3 dB upmix
    first_loud = int(np.argmax(np.abs(stereo[:, 0]) > 1000))
    assert first_loud < 48  # under 1 ms of filter delay, not a frame


async def test_frames_are_paced_against_the_clock_without_drift():
    track, clock = track_with_clock()
    start = clock.now
    for _ in range(500):
        await track.recv()
    # frame n is due at start + n*20ms: after 500 frames we are at frame 499's due time exactly
    assert clock.now == pytest.approx(start + 499 * 0.020, abs=1e-9)


async def test_a_late_frame_goes_out_at_once_and_a_long_stall_reanchors_instead_of_bursting():
    track, clock = track_with_clock()
    await track.recv()
    clock.now += 0.050  # 30 ms late for frame 1
    await track.recv()
    assert track.stats.late_frames == 1 and track.stats.reanchors == 0
    clock.now += 0.500  # a half-second stall
    await track.recv()
    assert track.stats.reanchors == 1
    sleeps_before = len(clock.sleeps)
    await track.recv()  # the next frame waits its 20 ms again: no burst
    assert len(clock.sleeps) == sleeps_before + 1 and clock.sleeps[-1] == pytest.approx(0.02)


async def test_model_audio_is_played_in_order_and_counted_per_item():
    track, _ = track_with_clock()
    a, b = tone(440, 50), tone(880, 30)  # 50 ms + 30 ms: frames straddle the items
    track.enqueue("item_a", a)
    track.enqueue("item_b", b)
    pcm = b"".join([mono24(await track.recv()) for _ in range(6)])
    heard = np.frombuffer(pcm, dtype="<i2").astype(float) / 32768
    # a 440 Hz tone for 50 ms, an 880 Hz tone for 30 ms, then silence (within the filter's sub-ms delay)
    assert abs(dominant_frequency(pcm[100:1100]) - 440) < 30
    assert abs(dominant_frequency(pcm[2500:3700]) - 880) < 40
    assert np.abs(heard[2000:]).max() < 0.01
    assert track.playout("item_a").played_samples == 1200
    assert track.playout("item_b").played_samples == 720


async def test_flush_drops_unplayed_audio_keeps_pts_continuous_and_reports_what_was_played():
    track, _ = track_with_clock()
    track.enqueue("item_a", tone(440, 1000))
    for _ in range(10):
        await track.recv()
    cut = track.flush()
    assert [(p.item_id, p.played_ms, p.audio_end_ms) for p in cut] == [("item_a", 200, 200)]
    await track.recv()  # the resampler's last fraction of a millisecond
    nxt = await track.recv()
    assert nxt.pts == 11 * 960
    assert not nxt.to_ndarray().any()
    assert track.buffered_ms == 0


async def test_started_fires_on_the_first_audio_frame_and_stopped_when_drained_after_end_of_audio():
    track, _ = track_with_clock()
    seen = []
    track.on_started = lambda i: seen.append(("started", i))
    track.on_stopped = lambda i: seen.append(("stopped", i))
    track.enqueue("item_a", tone(440, 40))
    track.end_of_audio()
    for _ in range(4):
        await track.recv()
    assert seen == [("started", "item_a"), ("stopped", "item_a")]


def test_truncation_point_is_what_was_played_never_more_than_was_received():
    assert ItemPlayout("i", received_samples=24000, played_samples=12000).audio_end_ms == 500
    assert ItemPlayout("i", received_samples=4800, played_samples=9600).audio_end_ms == 200
    # rounding goes down: 479 samples is 19.96 ms → 19
    assert ItemPlayout("i", received_samples=24000, played_samples=479).audio_end_ms == 19
