"""Voice to voice, as a person feels it: the end of what they said → the first sound of the answer.

An aiortc caller (the outside measure; `bench/voice_to_voice_browser.py` does the same
with real Chromium) speaks sentences through `server.py` with no key (the embedded
local backend, in its own process) and keeps what comes back, with the monotonic
time each 20 ms frame was handed to its encoder and each decoded frame arrived. For
every sentence:

- end of speech: the last sample above -40 dBFS of what the caller sent (each sample
  timed at its capture: a frame is handed over when its last sample is captured);
- first audible answer sample: the first 5 ms window above -40 dBFS of what the
  caller decoded after that, timed at its arrival (the caller plays what it decodes);
- hops, from the events on `oai-events` on the same clock: turn end (end of speech →
  `speech_stopped`: uplink, VAD hangover, silence window), recognition
  (→ transcription completed), responder (→ first transcript delta), synthesis and
  playback start (→ `output_audio_buffer.started`: the first sample handed to the
  encoder), downlink (→ first audible at the caller: network, the caller's jitter
  buffer, leading silence of the synthesised audio).

Some sentences have a 450 ms pause in the middle: an answer that starts inside the
pause (a `speech_stopped` before the sentence ends) is a cut-in.

    python bench/voice_to_voice.py [--rounds 2] [--turn-detection server_vad|semantic_vad] [--quick]

Writes bench/results/voice_to_voice.json; the last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ONE_ADDRESS, free_port, pcts, start_process, wait_http, write_result  # noqa: E402
from harness.caller import FRAME_48K, Caller, SourceTrack  # noqa: E402
from harness.speech import read_pcm, speech_wav  # noqa: E402
from media.audio import RTP_RATE  # noqa: E402

#: Held out (none is in the tests); "|" marks a 450 ms pause in the middle of a sentence.
SENTENCES = [
    "What time does the library open tomorrow?",
    "I would like to book a table for | two people tonight.",
    "Can you remind me to call my sister?",
    "The train to the airport was late again this morning.",
    "How many eggs do I need to | make a chocolate cake?",
    "Please play some quiet music in the kitchen.",
    "Where did I put the blue umbrella?",
    "My phone keeps losing the | signal when I walk to work.",
    "Tell me something nice about the ocean.",
    "We should plant tomatoes in the spring.",
]
PAUSE_S = 0.45
AUDIBLE_DBFS = -40.0
WINDOW = RTP_RATE // 200  # 5 ms
HOPS = ("turn_end", "recognition", "responder", "synthesis_and_playback_start", "downlink")


def sentence_pcm(text: str, folder: Path, index: int) -> tuple[bytes, list[tuple[float, float]]]:
    """48 kHz PCM16 of the sentence (Piper), and its parts' (start, end) in seconds."""
    pieces, spans, at = [], [], 0.0
    parts = [p.strip() for p in text.split("|")]
    for k, part in enumerate(parts):
        pcm, _ = read_pcm(speech_wav(part, folder / f"s{index}_{k}.wav", rate=RTP_RATE, pad_s=0.0))
        pcm = pcm[int(0.5 * RTP_RATE) * 2:]  # speech_wav pads 0.5 s in front
        loud = _loud_samples(pcm)
        first, last = (int(loud[0]), int(loud[-1]) + WINDOW - 1) if loud.size else (0, len(pcm) // 2 - 1)
        if pieces:  # the pause: exactly PAUSE_S of silence between the parts' speech
            pcm = pcm[first * 2:]
            last -= first
            first = 0
            pieces.append(bytes(int(PAUSE_S * RTP_RATE) * 2))
            at += PAUSE_S
        spans.append((at + first / RTP_RATE, at + last / RTP_RATE))
        pieces.append(pcm[: (last + 1) * 2])
        at += (last + 1) / RTP_RATE
    return b"".join(pieces), spans


def _loud_samples(pcm: bytes, rate: int = RTP_RATE) -> np.ndarray:
    """Indices of the 5 ms windows' first samples whose level is above AUDIBLE_DBFS, as sample indices."""
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32768.0
    w = rate // 200
    n = x.size // w
    if n == 0:
        return np.zeros(0, dtype=int)
    rms = np.sqrt((x[: n * w].reshape(n, w) ** 2).mean(axis=1) + 1e-12)
    idx = np.nonzero(20 * np.log10(rms) > AUDIBLE_DBFS)[0]
    return idx * w


class TimedSource(SourceTrack):
    """A microphone that remembers when each frame was handed to the encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[float, int]] = []  # (monotonic time, index of the frame's first sample in `played`)
        self.played = bytearray()

    def samples(self, n: int) -> np.ndarray:
        out = super().samples(n)
        self.sent.append((time.monotonic(), len(self.played) // 2))
        self.played += out.tobytes()
        return out

    def capture_time(self, sample: int) -> float:
        """When sample `sample` of `played` was captured (its frame is handed over when its last
        sample is)."""
        i = min(sample // FRAME_48K, len(self.sent) - 1)
        t, first = self.sent[i]
        return t - (FRAME_48K - (sample - first)) / RTP_RATE


def first_audible_after(caller: Caller, after: float) -> Optional[float]:
    """Arrival time of the first audible 5 ms of model audio decoded after `after`."""
    frames = caller.audio_frames
    start_byte = 0
    for t, end in frames:
        if t >= after:
            break
        start_byte = end
    pcm = bytes(caller.audio[start_byte:])
    loud = _loud_samples(pcm)
    if not loud.size:
        return None
    target = start_byte + int(loud[0]) * 2
    prev_end = 0
    for t, end in frames:
        if end > target:
            return t + (target - prev_end) / 2 / RTP_RATE
        prev_end = end
    return None


def _event_time(caller: Caller, kind: str, after: float, before: float = float("inf"), **match) -> Optional[float]:
    for event, t in zip(caller.events, caller.event_times):
        if after <= t < before and event.get("type") == kind and all(event.get(k) == v for k, v in match.items()):
            return t
    return None


async def speak_and_time(caller: Caller, source: TimedSource, pcm: bytes, spans: list[tuple[float, float]]) -> dict:
    begin_sample = len(source.played) // 2 + (len(source._queued) // 2)
    source.play(pcm)
    ends = [begin_sample + int(e * RTP_RATE) for _, e in spans]
    # wait for the sentence to be sent, then for the answer to be played out
    while len(source.played) // 2 < ends[-1] + FRAME_48K:
        await asyncio.sleep(0.02)
    t_end = source.capture_time(ends[-1])
    t_first_part_end = source.capture_time(ends[0])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _event_time(caller, "output_audio_buffer.stopped", t_end) is None:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    stops = [t for e, t in zip(caller.events, caller.event_times)
             if e.get("type") == "input_audio_buffer.speech_stopped" and t_first_part_end - 0.05 <= t < t_end]
    row: dict = {"cut_in": bool(stops) and len(spans) > 1, "has_pause": len(spans) > 1}
    t_stop = _event_time(caller, "input_audio_buffer.speech_stopped", t_end)
    t_tx = _event_time(caller, "conversation.item.input_audio_transcription.completed", t_end)
    t_said = _event_time(caller, "response.output_audio_transcript.delta", t_end)
    t_play = _event_time(caller, "output_audio_buffer.started", t_end)
    t_heard = first_audible_after(caller, t_end)
    if t_heard is None:
        row["missed"] = True
        return row
    marks = [t_end, t_stop, t_tx, t_said, t_play, t_heard]
    row["voice_to_voice_ms"] = round((t_heard - t_end) * 1000, 1)
    for hop, (a, b) in zip(HOPS, zip(marks, marks[1:])):
        if a is not None and b is not None:
            row[hop + "_ms"] = round((b - a) * 1000, 1)
    return row


async def run_calls(url: str, clips: list, rounds: int, turn_detection: Optional[dict]) -> list[dict]:
    source = TimedSource()
    caller = Caller(url, source=source)
    await caller.connect()
    await caller.wait_event("session.updated", timeout=30)
    if turn_detection is not None:
        caller.send_event({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "turn_detection": turn_detection}}}})
    await asyncio.sleep(1.0)
    rows = []
    try:
        for _ in range(rounds):
            for text, (pcm, spans) in clips:
                row = await speak_and_time(caller, source, pcm, spans)
                row["text"] = text
                rows.append(row)
                print(json.dumps(row), flush=True)
                await asyncio.sleep(0.8)
    finally:
        await caller.hangup()
        await caller.close()
    return rows


def summarise(rows: list[dict]) -> dict:
    out = {"voice_to_voice_ms": pcts(r["voice_to_voice_ms"] for r in rows if "voice_to_voice_ms" in r)}
    for hop in HOPS:
        out[hop + "_ms"] = pcts(r[hop + "_ms"] for r in rows if hop + "_ms" in r)
    pauses = [r for r in rows if r.get("has_pause")]
    out["cut_ins"] = sum(r["cut_in"] for r in pauses)
    out["pauses"] = len(pauses)
    out["missed"] = sum(1 for r in rows if r.get("missed"))
    return out


async def scenario(name: str, clips: list, rounds: int, server_args: list[str], env: dict,
                   turn_detection: Optional[dict]) -> dict:
    port = free_port()
    log = Path(tempfile.gettempdir()) / f"v2v-{name}.log"
    proc = start_process(["server.py", *ONE_ADDRESS, "--port", str(port), "--env-file", "/nonexistent",
                          "--log-level", "WARNING", *server_args], env=env, log=log)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 90)
        rows = await run_calls(f"http://127.0.0.1:{port}", clips, rounds, turn_detection)
    finally:
        proc.terminate()
        proc.wait(20)
    return {"name": name, "server_args": server_args, "turn_detection": turn_detection, "summary": summarise(rows),
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one round, the default settings only (no result file)")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="v2v-"))
    clips = [(text, sentence_pcm(text, folder, i)) for i, text in enumerate(SENTENCES)]
    rounds = 1 if args.quick else args.rounds
    scenarios = [("local backend, defaults", [], {}, None)]
    if not args.quick:
        scenarios += [("local backend, aiortc's audio path", ["--audio-path", "aiortc"], {}, None),
                      ("local backend, server_vad 500 ms (the previous default)", ["--turn-detection", "server_vad"], {},
                       None)]
    results = []
    for name, server_args, env, td in scenarios:
        results.append(asyncio.run(scenario(name, clips, rounds, server_args, env, td)))
        print(json.dumps({"scenario": name, **results[-1]["summary"]}), flush=True)
    path = write_result("voice_to_voice_quick" if args.quick else "voice_to_voice",
                        {"sentences": SENTENCES, "pause_ms": PAUSE_S * 1000, "rounds": rounds, "scenarios": results})
    print(f"wrote {path}", file=sys.stderr)
    print(json.dumps({r["name"]: r["summary"]["voice_to_voice_ms"] for r in results}))


if __name__ == "__main__":
    main()
