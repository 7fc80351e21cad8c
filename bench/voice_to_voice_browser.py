"""Voice to voice in a real Chromium: the end of what the microphone said → the first sound
the page plays back, both heard inside the page on one audio clock.

Chromium runs the bundled page with a fake microphone: a WAV of the sentences of
`bench/voice_to_voice.py` (Piper's voice, three of them with a 450 ms pause after an
open word), each followed by enough silence for the answer. Once the call is up, the
bench taps both streams in one Web Audio context of the page: the microphone track
(what the page sends, after Chromium's echo canceller, noise suppression and gain
control) and the remote stream the `<audio>` element plays (after Chromium's jitter
buffer and decoder). Every 256-sample block (5.3 ms at 48 kHz) is stamped with the
context time it plays at. Events on `oai-events` are stamped on the same clock.

For each sentence: end of speech = the end of its last block above -40 dBFS (the
sentence's blocks are those separated by less than 1 s of quiet); first audible
answer = the first remote block above -40 dBFS after it. Hops, from the events:
turn end (→ `speech_stopped`), recognition (→ transcription completed), responder
(→ first transcript delta), synthesis and playback start (→
`output_audio_buffer.started`: the bridge hands the first sample to its encoder),
downlink and playout (→ first audible in the page: RTP, Chromium's jitter buffer,
decode). An answer that sounds inside a sentence (in its pause) is a cut-in.
Chromium's own playout figures come from `getStats()` (`jitterBufferDelay` /
`jitterBufferEmittedCount`, and `totalPlayoutDelay` / `totalSamplesCount` of its
`media-playout` report).

    python bench/voice_to_voice_browser.py [--rounds 1] [--audio-path libopus|aiortc]

Writes bench/results/voice_to_voice_browser.json; the last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import wave
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ONE_ADDRESS, free_port, pcts, start_process, wait_http, write_result  # noqa: E402
from bench.voice_to_voice import HOPS, SENTENCES, sentence_pcm  # noqa: E402
from harness.browser import launch, start_call  # noqa: E402
from media.audio import RTP_RATE  # noqa: E402

AUDIBLE_DB = -40.0
SENTENCE_GAP_S = 1.0  # quiet that separates two sentences of the microphone (pauses are 0.45 s)
LEAD_S = 4.0  # silence at the start of the file: the tap starts once the call is up

TAP_JS = """async () => {
  const ctx = new AudioContext({ sampleRate: 48000 });
  await ctx.resume();
  const out = { mic: [], remote: [], events: [] };
  window.__v2v = out;
  const sink = ctx.createGain();
  sink.gain.value = 0;
  sink.connect(ctx.destination);
  const keep = [];
  function tap(stream, into) {
    const src = ctx.createMediaStreamSource(stream);
    const proc = ctx.createScriptProcessor(256, 1, 1);
    proc.onaudioprocess = (e) => {
      const x = e.inputBuffer.getChannelData(0);
      let s = 0;
      for (let i = 0; i < x.length; i++) s += x[i] * x[i];
      into.push([e.playbackTime, 10 * Math.log10(s / x.length + 1e-12)]);
    };
    src.connect(proc);
    proc.connect(sink);
    keep.push(src, proc);
  }
  tap(window.bridge.mic, out.mic);
  tap(document.querySelector('audio').srcObject, out.remote);
  window.__v2vKeep = keep;
  window.bridge.dc.addEventListener('message', (e) => {
    try { out.events.push([ctx.currentTime, JSON.parse(e.data).type]); } catch (err) {}
  });
  return ctx.sampleRate;
}"""

STATS_JS = """async () => {
  const out = {};
  (await window.bridge.pc.getStats()).forEach((s) => {
    if (s.type === 'inbound-rtp' && s.kind === 'audio') out.inbound = s;
    if (s.type === 'media-playout') out.playout = s;
  });
  return out;
}"""


def mic_file(folder: Path, rounds: int) -> tuple[Path, int]:
    """The microphone: LEAD_S of silence, then each sentence followed by room for its answer."""
    pieces = [bytes(int(LEAD_S * RTP_RATE) * 2)]
    count = 0
    for _ in range(rounds):
        for i, text in enumerate(SENTENCES):
            pcm, spans = sentence_pcm(text, folder, i)
            spoken = spans[-1][1]
            pieces += [pcm, bytes(int((2.5 + 1.5 * spoken) * RTP_RATE) * 2)]
            count += 1
    pieces.append(bytes(int(30 * RTP_RATE) * 2))  # the file loops: never start again during the run
    path = folder / "mic.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RTP_RATE)
        w.writeframes(b"".join(pieces))
    return path, count


def segments(blocks: list, gap_s: float) -> list[tuple[float, float]]:
    """(start, end) of runs of loud blocks separated by less than `gap_s` of quiet."""
    out: list[list[float]] = []
    for i, (t, db) in enumerate(blocks):
        if db <= AUDIBLE_DB:
            continue
        end = blocks[i + 1][0] if i + 1 < len(blocks) else t + 256 / 48000
        if out and t - out[-1][1] < gap_s:
            out[-1][1] = end
        else:
            out.append([t, end])
    return [(a, b) for a, b in out]


def analyse(data: dict, sentences: list[str]) -> list[dict]:
    mic = segments(data["mic"], SENTENCE_GAP_S)
    remote = [(t, db) for t, db in data["remote"] if db > AUDIBLE_DB]
    events = data["events"]
    rows = []
    for k, (start, end) in enumerate(mic):
        next_start = mic[k + 1][0] if k + 1 < len(mic) else float("inf")
        text = sentences[k % len(sentences)] if k < len(sentences) * 10 else "?"
        row: dict = {"text": text, "has_pause": "|" in text,
                     "cut_in": any(start < t < end - 0.05 for t, _ in remote)}
        heard = next((t for t, _ in remote if end <= t < next_start), None)
        if heard is None:
            row["missed"] = True
            rows.append(row)
            continue

        def first(kind: str) -> Optional[float]:
            return next((t for t, e in events if e == kind and end - 0.05 <= t < next_start), None)

        marks = [end, first("input_audio_buffer.speech_stopped"),
                 first("conversation.item.input_audio_transcription.completed"),
                 first("response.output_audio_transcript.delta"), first("output_audio_buffer.started"), heard]
        row["voice_to_voice_ms"] = round((heard - end) * 1000, 1)
        for hop, (a, b) in zip(HOPS, zip(marks, marks[1:])):
            if a is not None and b is not None:
                row[hop + "_ms"] = round((b - a) * 1000, 1)
        rows.append(row)
    return rows


def playout(stats: dict) -> dict:
    inbound, play = stats.get("inbound") or {}, stats.get("playout") or {}
    out = {}
    if inbound.get("jitterBufferEmittedCount"):
        out["jitter_buffer_ms"] = round(inbound["jitterBufferDelay"] / inbound["jitterBufferEmittedCount"] * 1000, 1)
        out["concealed_samples"] = inbound.get("concealedSamples")
        out["fec_packets_received"] = inbound.get("fecPacketsReceived")
    if play.get("totalSamplesCount"):
        out["playout_delay_ms"] = round(play["totalPlayoutDelay"] / play["totalSamplesCount"] * 1000, 1)
    return out


async def run(audio_path: str, rounds: int, folder: Path) -> dict:
    from playwright.async_api import async_playwright

    mic, count = mic_file(folder, rounds)
    seconds = wave.open(str(mic)).getnframes() / RTP_RATE - 30
    port = free_port()
    proc = start_process(["server.py", *ONE_ADDRESS, "--port", str(port), "--env-file", "/nonexistent",
                          "--log-level", "WARNING", "--audio-path", audio_path],
                         log=Path(tempfile.gettempdir()) / f"v2v-browser-{audio_path}.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 90)
        async with async_playwright() as p:
            browser = await launch(p, mic)
            try:
                page = await start_call(browser, f"http://127.0.0.1:{port}/", timeout_s=30)
                await page.evaluate(TAP_JS)
                await asyncio.sleep(seconds)
                data = await page.evaluate("() => window.__v2v")
                stats = await page.evaluate(STATS_JS)
            finally:
                await browser.close()
    finally:
        proc.terminate()
        proc.wait(20)
    rows = analyse(data, SENTENCES)
    summary = {"voice_to_voice_ms": pcts(r["voice_to_voice_ms"] for r in rows if "voice_to_voice_ms" in r)}
    for hop in HOPS:
        summary[hop + "_ms"] = pcts(r[hop + "_ms"] for r in rows if hop + "_ms" in r)
    pauses = [r for r in rows if r["has_pause"]]
    summary.update(cut_ins=sum(r["cut_in"] for r in pauses), pauses=len(pauses), sentences=len(rows),
                   sentences_spoken=count, missed=sum(1 for r in rows if r.get("missed")), chromium=playout(stats))
    return {"audio_path": audio_path, "summary": summary, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--audio-path", choices=("libopus", "aiortc", "both"), default="both")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="v2v-browser-"))
    paths = ("libopus", "aiortc") if args.audio_path == "both" else (args.audio_path,)
    results = []
    for path in paths:
        results.append(asyncio.run(run(path, args.rounds, folder)))
        print(json.dumps({"audio_path": path, **results[-1]["summary"]}), flush=True)
    out = write_result("voice_to_voice_browser", {"sentences": SENTENCES, "runs": results})
    print(f"wrote {out}", file=sys.stderr)
    print(json.dumps({r["audio_path"]: r["summary"]["voice_to_voice_ms"] for r in results}))


if __name__ == "__main__":
    main()
