"""The echo guard: the model's voice taken out of the caller's audio.

On its own (`media/echo.py` fed as a call feeds it, 20 ms of reference then 20 ms of
caller), and end to end: an aiortc caller whose microphone hears its loudspeaker
150 ms later at -6 dB through a reverberant room, against the embedded local backend,
whose VAD decides barge-in."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from scipy.signal import fftconvolve

import settings as config
from harness.caller import Caller
from harness.echo import EchoingMic, room_rir
from harness.speech import read_pcm, speech_wav
from localrt.server import build_local_app
from media.audio import REALTIME_RATE
from media.echo import EchoGuard

FRAME = REALTIME_RATE // 50
SPOKEN = ("The library on Main Street opens at nine in the morning and closes at six in the evening, "
          "except on Sundays, when it stays closed all day.")


@pytest.fixture(scope="module")
def far(tmp_path_factory) -> np.ndarray:
    pcm, _ = read_pcm(speech_wav(SPOKEN, tmp_path_factory.mktemp("echo") / "far.wav", rate=REALTIME_RATE, pad_s=0.5))
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32)


def echo_of(far: np.ndarray, delay_ms: float, gain_db: float) -> np.ndarray:
    y = fftconvolve(far, room_rir(REALTIME_RATE))[:far.size]
    y *= np.sqrt(np.mean(far ** 2) / np.mean(y ** 2)) * 10 ** (gain_db / 20)
    d = int(delay_ms * REALTIME_RATE / 1000)
    out = np.zeros_like(far)
    out[d:] = y[:far.size - d]
    return out + np.random.default_rng(1).standard_normal(far.size).astype(np.float32) * 30


def run(guard: EchoGuard, far: np.ndarray, near: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, far.size - FRAME + 1, FRAME):
        guard.reference(np.clip(far[i:i + FRAME], -32768, 32767).astype("<i2").tobytes())
        got = guard.process(np.clip(near[i:i + FRAME], -32768, 32767).astype("<i2").tobytes())
        out.append(np.frombuffer(got, dtype="<i2").astype(np.float32))
    return np.concatenate(out)


def erle_db(near: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(near ** 2) / max(np.sum(out ** 2), 1.0)))


@pytest.mark.parametrize("delay_ms", [80, 150, 400])
def test_echo_is_removed_after_a_second_whatever_the_delay(far, delay_ms):
    near = echo_of(far, delay_ms, -6)
    guard = EchoGuard("auto")
    out = run(guard, far, near)
    settled = slice(int(2.0 * REALTIME_RATE), out.size)
    assert erle_db(near[settled], out[settled]) >= 25
    assert guard.stats.detected and guard.stats.state == "echo"
    assert guard.stats.detected_after_s is not None and guard.stats.detected_after_s <= 2.0
    assert guard.stats.cancelled_ms > 0


def test_a_caller_without_echo_reaches_the_model_untouched(far):
    rng = np.random.default_rng(4)
    talk = (rng.standard_normal(far.size) * 2000).astype(np.int16).astype(np.float32)  # a loud caller, no echo at all
    guard = EchoGuard("auto")
    out = run(guard, far, talk)
    assert guard.stats.state == "clear" and not guard.stats.detected
    # once the call has shown it has no echo, the caller's audio passes bit for bit
    after = int((guard.stats.processed_ms / 1000) * REALTIME_RATE)
    assert after < out.size
    clear_from = next(i for i in range(0, out.size, FRAME) if np.array_equal(out[i:], talk[i:out.size]))
    assert clear_from <= 4.5 * REALTIME_RATE
    # before the model ever speaks, nothing runs
    silent = EchoGuard("on")
    pcm = talk[:FRAME].astype("<i2").tobytes()
    assert silent.process(pcm) == pcm and silent.stats.processed_ms == 0


def test_off_changes_nothing_and_on_keeps_cancelling(far):
    near = echo_of(far, 150, -6)
    off = EchoGuard("off")
    assert np.array_equal(run(off, far, near), np.clip(near[:far.size - far.size % FRAME], -32768, 32767)
                          .astype("<i2").astype(np.float32))
    assert off.stats.processed_ms == 0
    with pytest.raises(ValueError):
        EchoGuard("sometimes")


def test_the_reference_cursor_follows_an_uplink_outage(far):
    """The caller's audio stops for a second (its network went away): the reference read
    jumps by as much, so the canceller is aligned again at once."""
    near = echo_of(far, 150, -6)
    guard = EchoGuard("on")
    out = []
    gap = range(int(4.0 * REALTIME_RATE) // FRAME * FRAME, int(5.0 * REALTIME_RATE) // FRAME * FRAME, FRAME)
    for i in range(0, far.size - FRAME + 1, FRAME):
        guard.reference(far[i:i + FRAME].astype("<i2").tobytes())
        if i in gap:
            continue
        got = guard.process(np.clip(near[i:i + FRAME], -32768, 32767).astype("<i2").tobytes())
        out.append((i, np.frombuffer(got, dtype="<i2").astype(np.float32)))
    assert guard.stats.resyncs == 1
    after = [(i, o) for i, o in out if i >= gap.stop + int(0.5 * REALTIME_RATE)]
    e_in = sum(float(np.sum(near[i:i + FRAME] ** 2)) for i, _ in after)
    e_out = sum(float(np.sum(o ** 2)) for _, o in after)
    assert 10 * np.log10(e_in / e_out) >= 25


# -- end to end ----------------------------------------------------------------------

async def _say(caller: Caller, text: str) -> None:
    caller.send_event({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
    caller.send_event({"type": "response.create"})


def _after(caller: Caller, kind: str, t0: float) -> list[dict]:
    return [e for t, e in zip(caller.event_times, caller.events) if e.get("type") == kind and t >= t0]


@pytest.mark.parametrize("guard", ["off", "auto"])
async def test_a_phone_on_speaker_does_not_interrupt_the_model_but_its_caller_still_can(
        start_bridge, tmp_path, guard):
    local = web.AppRunner(build_local_app(config.from_raw({})))
    await local.setup()
    await web.TCPSite(local, "127.0.0.1", 0).start()
    mic = EchoingMic(delay_ms=150, gain_db=-6, rir=room_rir(), noise_dbfs=-60)
    caller = None
    try:
        bridge = await start_bridge(f"ws://127.0.0.1:{local.addresses[0][1]}/v1/realtime", echo_guard=guard)
        caller = Caller(bridge.url, source=mic, on_frame=mic.hear)
        await caller.connect()
        await caller.wait_event("session.updated", timeout=30)
        t0 = time.monotonic()
        await _say(caller, SPOKEN)
        await caller.next_event("output_audio_buffer.started", timeout=30)
        if guard == "off":
            # the harness's echo is real: without the guard the model hears itself and stops
            await caller.next_event("input_audio_buffer.speech_started", timeout=10)
            return
        await caller.next_event("output_audio_buffer.stopped", timeout=60)
        await asyncio.sleep(1.0)  # the echo's tail
        assert _after(caller, "input_audio_buffer.speech_started", t0) == []
        assert _after(caller, "output_audio_buffer.cleared", t0) == []
        call = next(iter(bridge.registry.calls.values()))
        assert call.echo.stats.detected and call.echo.stats.erle_db and min(call.echo.stats.erle_db) >= 20
        # the caller talks over the model: that still interrupts it
        t1 = time.monotonic()
        await _say(caller, SPOKEN)
        await caller.next_event("output_audio_buffer.started", timeout=30)
        await asyncio.sleep(2.0)
        pcm, _ = read_pcm(speech_wav("Wait, stop for a moment please.", tmp_path / "stop.wav", rate=48000, pad_s=1.0))
        mic.play(pcm)
        await caller.next_event("output_audio_buffer.cleared", timeout=5)
        assert len(_after(caller, "input_audio_buffer.speech_started", t1)) == 1
        async with aiohttp.ClientSession() as http:
            async with http.get(bridge.url + "/metrics") as resp:
                text = await resp.text()
        detected = [s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "bridge_echo_detected_calls_total"]
        assert detected == [1.0]
    finally:
        if caller is not None:
            await caller.hangup()
            await caller.close()
        await local.cleanup()


def test_the_timeline_has_no_seam_where_the_canceller_stops_and_starts(far):
    """While the canceller's output is what the model gets, the caller's audio runs its
    delay behind; when the model falls silent the audio goes on through a delay line of the
    same length, so not a sample is lost or repeated, and it starts again seamlessly."""
    from media.echo import TAIL_S, aec_latency

    lat = aec_latency()
    assert 0 < lat < REALTIME_RATE // 50
    rng = np.random.default_rng(9)
    near = (rng.standard_normal(far.size) * 1000).astype(np.int16).astype(np.float32)
    model = far.copy()
    gap = slice(int(3 * REALTIME_RATE), int(6 * REALTIME_RATE))
    model[gap] = 0  # the model is silent for 3 s in the middle
    guard = EchoGuard("on")
    out = run(guard, model, near)
    quiet = range(gap.start + int(TAIL_S * REALTIME_RATE) + FRAME, gap.stop - FRAME)
    assert np.array_equal(out[quiet.start:quiet.stop], near[quiet.start - lat:quiet.stop - lat])
    assert out.size == near.size - near.size % FRAME  # nothing held back, nothing added


def test_a_caller_quiet_while_the_model_speaks_has_no_echo(far):
    """A browser whose own canceller works sends near silence while the model talks: that is
    the proof of no echo, and the guard stands aside (no delay, no processing)."""
    quiet = np.random.default_rng(5).standard_normal(far.size).astype(np.float32) * 20  # -64 dBFS
    guard = EchoGuard("auto")
    out = run(guard, far, quiet)
    assert guard.stats.state == "clear" and not guard.stats.detected
    assert guard.stats.cleared_after_s is not None and guard.stats.cleared_after_s <= 4.0
    tail = slice(int(6 * REALTIME_RATE), out.size)
    assert np.array_equal(out[tail], np.clip(quiet, -32768, 32767).astype("<i2")[tail].astype(np.float32))


def test_in_the_canceller_s_first_second_what_could_be_echo_is_turned_down_and_a_louder_caller_is_not(
        far, monkeypatch):
    import media.echo as echo

    first = int(echo.CAUTIOUS_MS / 1000 * REALTIME_RATE) // FRAME * FRAME
    speech = int(np.flatnonzero(np.abs(far) > 1000)[0]) // FRAME * FRAME  # the model's first words
    model = far[speech:speech + first]
    echoed = echo_of(model, 150, -6)  # at most as loud as the model itself
    rng = np.random.default_rng(5)  # a caller talking over the model, louder at their microphone than it
    loud = (rng.standard_normal(model.size) * 3 * np.sqrt(np.mean(model ** 2))).astype(np.float32)

    def through(near: np.ndarray, cautious: bool) -> np.ndarray:
        monkeypatch.setattr(echo, "CAUTIOUS_MS", echo.CAUTIOUS_MS if cautious else 0)
        guard = EchoGuard("on")
        out = run(guard, model, near)
        assert guard.stats.processed_ms <= 1000
        return out[int(0.2 * REALTIME_RATE):]  # (the first 0.2 s: the canceller's own start)

    gated, alone = through(echoed, True), through(echoed, False)
    # what AEC3 lets through while it converges, where a VAD could hear it, is turned down
    block = REALTIME_RATE // 100
    heard = np.sqrt(np.mean(alone[:alone.size // block * block].reshape(-1, block) ** 2, axis=1)) \
        > 32768 * 10 ** (echo.VOICED_DBFS / 20)
    assert heard.sum() > 20
    mask = np.repeat(heard, block)
    assert erle_db(alone[:mask.size][mask], gated[:mask.size][mask]) >= 15
    assert erle_db(through(loud, False), through(loud, True)) < 1  # the caller is not
