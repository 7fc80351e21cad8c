"""Echo guard: a phone on speaker, guard off against guard on, in the same run.

End to end (real aiortc caller, `server.py` with no key: the embedded local
backend decides barge-in with its own VAD): the caller's microphone picks up what it
plays (`harness/echo.py`: `--delay-ms` later, at `--gain-db`, through a simulated
reverberant room, with background noise at -60 dBFS). The model is made to speak
long replies (a text message, then `response.create`) while the caller says nothing;
everything the backend hears then is the model's own voice:

- false barge-ins: `input_audio_buffer.speech_started` while the caller was silent;
- echoed turns and words: captions (`…transcription.completed`) in those stretches;
- double talk: the caller speaks over the model `--tries` times at a random point:
  speech onset (its first sample above -40 dBFS, timed at capture) → the bridge
  flushing the model's audio (`output_audio_buffer.cleared` on `oai-events`), and how
  many interruptions were missed.

Offline, on the canceller alone (`media/echo.py`, fed as the call feeds it, 20 ms at a
time): echo return loss enhancement after convergence at delays 80-400 ms and
attenuations 0 to -20 dB, how long it takes to converge from the first model audio
and after the delay jumps by 100 ms, a drifting delay, and a call without echo (PESQ-WB
of the caller's speech over the model's, guard auto against off; the added latency).
CPU per call: process time of the canceller per second of call.

    python bench/echo_guard.py [--minutes 5] [--tries 20] [--quick]

Writes bench/results/echo_guard.json (echo_guard_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ONE_ADDRESS, free_port, pcts, start_process, wait_http, write_result  # noqa: E402
from harness.caller import Caller  # noqa: E402
from harness.echo import EchoingMic, room_rir  # noqa: E402
from harness.speech import read_pcm, speech_wav  # noqa: E402
from media.audio import REALTIME_RATE, RTP_RATE  # noqa: E402

#: What the model is made to say (about 25 s each with Piper's voice).
PARAGRAPHS = [
    "The library on Main Street opens at nine in the morning and closes at six in the evening. On Saturdays it "
    "closes early, at two, and on Sundays it stays closed, except in December, when the reading room is open "
    "for students preparing for their exams. You can renew your books online or by phone.",
    "To make a simple tomato soup, soften an onion and two cloves of garlic in olive oil, add a kilo of ripe "
    "tomatoes and a little stock, and let it simmer for twenty minutes. Blend it until smooth, season it with "
    "salt, pepper and a pinch of sugar, and serve it with fresh basil and warm bread.",
    "The train to the airport leaves every fifteen minutes from platform four. The journey takes about forty "
    "minutes, and tickets can be bought on the platform or on the train itself. At night the service runs "
    "every half hour, and the last train leaves the city a little after midnight.",
]
#: What the caller says over the model.
PARAGRAPH_S = 15.0
INTERRUPTIONS = ["Wait, stop for a moment please.", "Sorry, can I ask something?", "Hold on, that is not right."]
LOUD_DBFS = -40.0


def say(mic: EchoingMic, pcm: bytes) -> float:
    """The caller says `pcm` (48 kHz); returns the monotonic time its first loud sample is captured."""
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    loud = np.flatnonzero(np.abs(x) > 10 ** (LOUD_DBFS / 20))
    return mic.play(pcm) + (int(loud[0]) if loud.size else 0) / RTP_RATE


def _since(caller: Caller, kind: str, t0: float, t1: float = float("inf")) -> list[tuple[float, dict]]:
    return [(t, e) for t, e in zip(caller.event_times, caller.events) if e.get("type") == kind and t0 <= t < t1]


async def model_says(caller: Caller, text: str, timeout: float = 90.0) -> tuple[float, float]:
    """The model speaks `text` (as the echo responder repeats it); returns when its audio
    started and stopped at the bridge."""
    caller.send_event({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
    caller.send_event({"type": "response.create"})
    started = await caller.next_event("output_audio_buffer.started", timeout)
    t_start = caller.event_times[caller.events.index(started)]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        stops = _since(caller, "output_audio_buffer.stopped", t_start) + _since(caller, "output_audio_buffer.cleared",
                                                                             t_start)
        if stops:
            return t_start, min(t for t, _ in stops)
        await asyncio.sleep(0.1)
    raise TimeoutError("the model's audio never stopped")


async def echo_run(url: str, guard: str, minutes: float, tries: int, clips: list[bytes], delay_ms: float,
                   gain_db: float, rng: random.Random) -> dict:
    mic = EchoingMic(delay_ms=delay_ms, gain_db=gain_db, rir=room_rir(), noise_dbfs=-60.0)
    caller = Caller(url, source=mic, on_frame=mic.hear)
    await caller.connect()
    await caller.wait_event("session.updated", timeout=30)
    await asyncio.sleep(1.0)
    spoken_s = 0.0
    false_barge_ins = echoed_turns = 0
    echoed_words: list[str] = []
    flush_ms: list[float] = []
    missed = cut_before = 0
    try:
        # as many paragraphs as make `minutes` of speech when nothing interrupts them (with the
        # guard off the model cuts itself off early, and speaks less)
        rounds = max(1, math.ceil(minutes * 60 / PARAGRAPH_S))
        for i in range(rounds):
            if spoken_s >= minutes * 60:
                break
            mic.enabled = True
            t0, t1 = await model_says(caller, PARAGRAPHS[i % len(PARAGRAPHS)])
            spoken_s += t1 - t0
            await asyncio.sleep(1.5)  # the echo's tail, and any turn it started, ends
            window_end = time.monotonic()
            false_barge_ins += len(_since(caller, "input_audio_buffer.speech_started", t0, window_end))
            turns = _since(caller, "conversation.item.input_audio_transcription.completed", t0, window_end)
            echoed_turns += len(turns)
            echoed_words += [w for _, e in turns for w in e.get("transcript", "").split()]
            # a reply to an echoed turn may still be playing, and answer its own echo again: the
            # room goes quiet (no echo) until it ends, before the next one
            mic.mute()
            await _quiet(caller)
            print(json.dumps({"guard": guard, "model_speech_s": round(spoken_s, 1), "false_barge_ins": false_barge_ins,
                              "echoed_turns": echoed_turns}), flush=True)
        # without the guard the model cuts itself off before the caller says a word: a few
        # tries show that, more only take time
        for k in range(tries if guard != "off" else min(tries, 3)):
            mic.enabled = True
            caller.send_event({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": PARAGRAPHS[k % 3]}]}})
            caller.send_event({"type": "response.create"})
            started = await caller.next_event("output_audio_buffer.started", 60)
            t_start = caller.event_times[caller.events.index(started)]
            await asyncio.sleep(rng.uniform(2.0, 8.0))
            onset = say(mic, clips[k % len(clips)])
            deadline = time.monotonic() + 5.0
            cleared = []
            while time.monotonic() < deadline and not cleared:
                cleared = _since(caller, "output_audio_buffer.cleared", t_start)
                await asyncio.sleep(0.02)
            if cleared and cleared[0][0] < onset:
                cut_before += 1  # the model had already cut itself off (its echo), before the caller spoke
            elif cleared:
                flush_ms.append((cleared[0][0] - onset) * 1000)
            else:
                missed += 1
            mic.mute()
            await _quiet(caller)
    finally:
        await caller.hangup()
        await caller.close()
    return {"guard": guard, "model_speech_s": round(spoken_s, 1), "false_barge_ins": false_barge_ins,
            "echoed_turns": echoed_turns, "echoed_words": len(echoed_words),
            "echoed_sample": " ".join(echoed_words[:30]),
            "double_talk": {"tries": tries if guard != "off" else min(tries, 3), "missed": missed, "cut_off_by_its_echo_first": cut_before,
                            "speech_onset_to_flush_ms": pcts(flush_ms),
                            "each_ms": [round(x) for x in flush_ms]}}


async def _quiet(caller: Caller, settle_s: float = 2.0, timeout: float = 30.0) -> None:
    """Until nothing has been played or said for `settle_s` (a reply to an echoed turn, its echo...)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        last = max([t for t, e in zip(caller.event_times, caller.events)
                    if e.get("type") in ("output_audio_buffer.started", "output_audio_buffer.stopped",
                                         "output_audio_buffer.cleared", "input_audio_buffer.speech_started",
                                         "input_audio_buffer.speech_stopped", "response.created")] or [0.0])
        playing = any(e.get("type") == "output_audio_buffer.started" for e in caller.events) and \
            _last_kind(caller, ("output_audio_buffer.started", "output_audio_buffer.stopped",
                                "output_audio_buffer.cleared")) == "output_audio_buffer.started"
        if not playing and time.monotonic() - last > settle_s:
            return
        await asyncio.sleep(0.1)


def _last_kind(caller: Caller, kinds: tuple[str, ...]) -> str:
    for e in reversed(caller.events):
        if e.get("type") in kinds:
            return e["type"]
    return ""


async def end_to_end(guard: str, args, clips: list[bytes]) -> dict:
    port = free_port()
    log = Path(tempfile.gettempdir()) / f"echo-guard-{guard}.log"
    proc = start_process(["server.py", *ONE_ADDRESS, "--port", str(port), "--env-file", "/nonexistent",
                          "--log-level", "INFO", "--echo-guard", guard], log=log)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 90)
        return await echo_run(f"http://127.0.0.1:{port}", guard, args.minutes, args.tries, clips, args.delay_ms,
                              args.gain_db, random.Random(5))
    finally:
        proc.terminate()
        proc.wait(20)


# -- the canceller alone ----------------------------------------------------------------

def _speech24(folder: Path) -> np.ndarray:
    out = []
    for i, text in enumerate(PARAGRAPHS[:2]):
        pcm, rate = read_pcm(speech_wav(text, folder / f"far{i}.wav", rate=REALTIME_RATE, pad_s=0.5))
        out.append(np.frombuffer(pcm, dtype="<i2"))
    return np.concatenate(out).astype(np.float32)


def _echo_of(far: np.ndarray, delay_ms: float, gain_db: float, jump_at_s: float = 0.0, jump_ms: float = 0.0,
             drift_ms_per_s: float = 0.0) -> np.ndarray:
    from scipy.signal import fftconvolve

    y = fftconvolve(far, room_rir(REALTIME_RATE))[:far.size]
    y *= np.sqrt(np.mean(far ** 2) / max(np.mean(y ** 2), 1e-9)) * 10 ** (gain_db / 20)
    t = np.arange(far.size) / REALTIME_RATE
    delay = delay_ms + drift_ms_per_s * t + np.where(t >= jump_at_s, jump_ms, 0.0) * (jump_ms != 0)
    src = np.arange(far.size) - delay * REALTIME_RATE / 1000
    echo = np.interp(src, np.arange(far.size), y, left=0.0)
    return echo + np.random.default_rng(1).standard_normal(far.size) * 10 ** (-60 / 20) * 32768


def _run_guard(far: np.ndarray, near: np.ndarray, mode: str = "on", lead_ms: float = 0.0):
    """Feed the guard as a call does: one 20 ms reference frame, then the caller's 20 ms."""
    from media.echo import EchoGuard

    guard = EchoGuard(mode)
    n = REALTIME_RATE // 50
    out = []
    for i in range(0, far.size - n + 1, n):
        guard.reference(np.clip(far[i:i + n], -32768, 32767).astype("<i2").tobytes())
        got = guard.process(np.clip(near[i:i + n], -32768, 32767).astype("<i2").tobytes())
        out.append(np.frombuffer(got, dtype="<i2").astype(np.float32))
    return np.concatenate(out), guard


def _erle_series(near: np.ndarray, out: np.ndarray, win_s: float = 0.25) -> list[tuple[float, float]]:
    w = int(win_s * REALTIME_RATE)
    rows = []
    for i in range(0, min(near.size, out.size) - w, w):
        e_in = float(np.mean(near[i:i + w] ** 2))
        if e_in > (10 ** (-45 / 20) * 32768) ** 2:  # echo present in this window
            rows.append((i / REALTIME_RATE, 10 * np.log10(e_in / max(float(np.mean(out[i:i + w] ** 2)), 1.0))))
    return rows


def _converged_after(series: list[tuple[float, float]], since: float, level: float = 20.0) -> float:
    """Seconds from `since` until the ERLE stays at `level` dB or more (two windows in a row)."""
    after = [(t, e) for t, e in series if t >= since]
    for k in range(len(after) - 1):
        if after[k][1] >= level and after[k + 1][1] >= level:
            return round(after[k][0] - since, 2)
    return float("nan")


def offline(folder: Path) -> dict:
    far = _speech24(folder)
    first = float(np.flatnonzero(np.abs(far) > 300)[0]) / REALTIME_RATE
    rows = []
    for delay in (80, 150, 250, 400):
        for gain in (0, -6, -20):
            near = _echo_of(far, delay, gain)
            out, guard = _run_guard(far, near)
            series = _erle_series(near, out)
            settled = [e for t, e in series if t >= first + 2.0]
            rows.append({"delay_ms": delay, "gain_db": gain, "erle_db_p50": round(float(np.median(settled)), 1),
                         "converged_s": _converged_after(series, first),
                         "cpu_core": round(guard.stats.cpu_s / (far.size / REALTIME_RATE), 4)})
            print(json.dumps(rows[-1]), flush=True)
    jump_at = first + 10.0
    near = _echo_of(far, 150, -6, jump_at_s=jump_at, jump_ms=100)
    out, _ = _run_guard(far, near)
    series = _erle_series(near, out)
    jump = {"delay_ms": "150 → 250", "reconverged_s": _converged_after(series, jump_at),
            "erle_db_p50_after": round(float(np.median([e for t, e in series if t >= jump_at + 3])), 1)}
    near = _echo_of(far, 120, -6, drift_ms_per_s=4.0)  # 120 → ~300 ms over the clip
    out, _ = _run_guard(far, near)
    series = _erle_series(near, out)
    drift = {"delay_ms": f"120 → {120 + 4 * far.size / REALTIME_RATE:.0f} (4 ms/s)",
             "erle_db_p50": round(float(np.median([e for t, e in series if t >= first + 2])), 1)}
    return {"erle": rows, "delay_jump": jump, "drift": drift, "no_echo": no_echo(folder, far)}


def no_echo(folder: Path, far: np.ndarray) -> dict:
    """A call without echo: the caller talks over the model now and then; what the model gets
    with the guard on auto against off."""
    from pesq import pesq
    from scipy.signal import resample_poly

    talk = []
    for i, text in enumerate(INTERRUPTIONS * 3):
        pcm, _ = read_pcm(speech_wav(text, folder / f"near{i}.wav", rate=REALTIME_RATE, pad_s=1.5))
        talk.append(np.frombuffer(pcm, dtype="<i2").astype(np.float32))
    near = np.concatenate(talk)[:far.size]
    near = np.concatenate([near, np.zeros(far.size - near.size, dtype=np.float32)])
    near += np.random.default_rng(2).standard_normal(near.size) * 10 ** (-60 / 20) * 32768
    off, _ = _run_guard(far, near, "off")
    auto, guard = _run_guard(far, near, "auto")

    def score(x: np.ndarray, start_s: float = 0.0) -> float:
        k = int(start_s * REALTIME_RATE)
        return float(pesq(16000, resample_poly(near[k:], 2, 3), resample_poly(x[k:], 2, 3), "wb"))

    # the guard adds no delay: the output lines up with the input sample for sample
    lag = int(np.argmax(np.correlate(auto[:REALTIME_RATE * 5], near[:REALTIME_RATE * 5], "full"))) - \
        (REALTIME_RATE * 5 - 1)
    late = slice(REALTIME_RATE * 10, REALTIME_RATE * 15)
    lag_after = int(np.argmax(np.correlate(auto[late], near[late], "full"))) - (late.stop - late.start - 1)
    # from where the model gets the caller's audio exactly as it came
    same = np.flatnonzero(auto != np.clip(near[:auto.size], -32768, 32767).astype("<i2"))
    exact_s = (int(same[-1]) + 1) / REALTIME_RATE if same.size else 0.0
    verdict = guard.stats.cleared_after_s
    return {"pesq_wb_off": round(score(off), 3), "pesq_wb_auto": round(score(auto), 3),
            "state": guard.stats.state, "cleared_after_s": verdict,
            "untouched_from_s": round(exact_s, 2),
            "pesq_wb_off_after_verdict": round(score(off, exact_s), 3),
            "pesq_wb_auto_after_verdict": round(score(auto, exact_s), 3),
            "added_latency_ms_before_verdict": round(lag * 1000 / REALTIME_RATE, 2),
            "added_latency_ms_after_verdict": round(lag_after * 1000 / REALTIME_RATE, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="model speech per guard setting")
    ap.add_argument("--tries", type=int, default=20, help="double-talk interruptions per guard setting")
    ap.add_argument("--delay-ms", type=float, default=150.0)
    ap.add_argument("--gain-db", type=float, default=-6.0)
    ap.add_argument("--quick", action="store_true", help="1 minute and 5 tries, no offline part")
    ap.add_argument("--guards", default="off,auto")
    args = ap.parse_args()
    if args.quick:
        args.minutes, args.tries = min(args.minutes, 1.0), min(args.tries, 5)
    folder = Path(tempfile.mkdtemp(prefix="echo-"))
    clips = [read_pcm(speech_wav(t, folder / f"i{i}.wav", rate=RTP_RATE, pad_s=0.5))[0]
             for i, t in enumerate(INTERRUPTIONS)]
    result: dict = {"echo": {"delay_ms": args.delay_ms, "gain_db": args.gain_db, "room": "4 x 3.5 x 2.7 m, absorption 0.35",
                             "noise_dbfs": -60}}
    result["end_to_end"] = [asyncio.run(end_to_end(g, args, clips)) for g in args.guards.split(",")]
    for row in result["end_to_end"]:
        print(json.dumps(row), flush=True)
    if not args.quick:
        result["canceller"] = offline(folder)
    path = write_result("echo_guard_quick" if args.quick else "echo_guard", result)
    print(f"wrote {path}", file=sys.stderr)
    print(json.dumps({r["guard"]: {k: r[k] for k in ("false_barge_ins", "echoed_turns", "echoed_words")}
                      for r in result["end_to_end"]}))


if __name__ == "__main__":
    main()
