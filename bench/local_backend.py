"""The offline backend as a user meets it: does it hear right, how soon does it answer.

Two measurements, each run with the bundled Whisper (the default) and, in the same
run, with the previous recogniser (`LOCAL_STT_MODEL=pocketsphinx`) for comparison:

- Word error rate through the bridge: `server.py` with no key (the embedded local
  backend) in its own process; an aiortc caller speaks held-out sentences (Piper's
  voice, then espeak-ng's) over real WebRTC; the user captions on `oai-events` are
  scored against what was said.
- Latency: `python -m localrt` in its own process; utterances streamed in real time
  over a real WebSocket, 1 session and then N at once; `speech_stopped` → first
  `response.output_audio.delta`. Also the RSS of the model worker processes.

    python bench/local_backend.py [--utterances 20] [--concurrent 4]

Writes bench/results/local_backend.json; the last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from websockets.asyncio.client import connect  # noqa: E402

from bench.common import ONE_ADDRESS, ProcStats, free_port, pcts, start_process, wait_http, write_result  # noqa: E402
from harness.caller import Caller  # noqa: E402
from harness.speech import read_pcm, speech_wav, word_error_rate  # noqa: E402
from realtime import events  # noqa: E402
from realtime.events import Server  # noqa: E402

# Held out: none of these is in the tests.
SENTENCES = [
    "What is the weather like today?",
    "Please tell me a story about a dragon.",
    "How far away is the moon?",
    "Good morning, how are you?",
    "Can you help me cook dinner tonight?",
    "I left my keys somewhere in the garden.",
    "Which bus goes to the central station?",
    "Send a message to my brother saying I will be late.",
    "The children want to visit the zoo on Saturday.",
    "Is it going to snow in the mountains this week?",
    "Turn the volume down a little, please.",
    "My doctor told me to walk more every day.",
]
ENGINES = {"whisper": "", "pocketsphinx": "pocketsphinx"}


def clips(voice: str, rate: int, folder: Path) -> list[tuple[str, bytes]]:
    out = []
    for i, text in enumerate(SENTENCES):
        pcm, _ = read_pcm(speech_wav(text, folder / f"{voice}{i}.wav", rate=rate, pad_s=1.0, voice=voice))
        out.append((text, pcm))
    return out


# -- word error rate through the bridge ------------------------------------------------


async def captions_through_bridge(url: str, spoken: list[tuple[str, bytes]]) -> list[tuple[str, str]]:
    caller = Caller(url, keep_audio=False)
    await caller.connect()
    await caller.wait_event("session.updated", timeout=20)
    pairs = []
    try:
        for text, pcm48 in spoken:
            before = len(caller.events_of("conversation.item.input_audio_transcription.completed"))
            caller.source.play(pcm48)
            for _ in range(400):
                done = caller.events_of("conversation.item.input_audio_transcription.completed")
                if len(done) > before:
                    pairs.append((text, done[-1]["transcript"]))
                    break
                await asyncio.sleep(0.05)
            else:
                pairs.append((text, ""))
    finally:
        await caller.hangup()
        await caller.close()
    return pairs


def wer(pairs: list[tuple[str, str]]) -> float:
    return round(word_error_rate(" ".join(s for s, _ in pairs), " ".join(h for _, h in pairs)), 3)


async def bridge_wer(engine: str, speech: dict[str, list]) -> dict:
    port = free_port()
    proc = start_process(["server.py", *ONE_ADDRESS, "--port", str(port), "--env-file", "/nonexistent", "--log-level", "WARNING"],
                         env={"LOCAL_STT_MODEL": ENGINES[engine]})
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 60)
        out = {}
        for voice, spoken in speech.items():
            pairs = await captions_through_bridge(f"http://127.0.0.1:{port}", spoken)
            out[voice] = {"wer": wer(pairs), "examples": pairs[:4], "misheard": [p for p in pairs if
                                                                                  word_error_rate(*p) > 0][:6]}
        return out
    finally:
        proc.terminate()
        proc.wait(15)


# -- latency on the backend's own WebSocket --------------------------------------------


async def session(url: str, utterances: list[tuple[str, bytes]], results: list) -> None:
    async with connect(url, max_size=None) as ws:
        await ws.recv()  # session.created
        await ws.send(events.dumps(events.session_update({"type": "realtime", "audio": {"input": {
            "transcription": {"model": "local"},
            "turn_detection": {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 500}}}})))
        queue: asyncio.Queue = asyncio.Queue()

        async def reader():
            async for message in ws:
                queue.put_nowait((time.monotonic(), json.loads(message)))

        read_task = asyncio.ensure_future(reader())
        try:
            for _, pcm in utterances:
                start = time.monotonic()
                for n, i in enumerate(range(0, len(pcm), 960)):
                    await ws.send(events.dumps(events.input_audio_append(pcm[i:i + 960])))
                    wait = start + (n + 1) * 0.02 - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                stopped_at = None
                while True:
                    at, event = await asyncio.wait_for(queue.get(), 30)
                    kind = event["type"]
                    if kind == Server.SPEECH_STOPPED:
                        stopped_at = at
                    elif kind == Server.OUTPUT_AUDIO_DELTA and stopped_at is not None:
                        results.append((at - stopped_at) * 1000)
                        stopped_at = None
                    elif kind == Server.RESPONSE_DONE:
                        break
        finally:
            read_task.cancel()


async def latency(engine: str, utts: list[tuple[str, bytes]], concurrent: int) -> dict:
    port = free_port()
    proc = start_process(["-m", "localrt", "--port", str(port), "--log-level", "WARNING"],
                         env={"LOCAL_STT_MODEL": ENGINES[engine]})
    try:
        for _ in range(600):
            try:
                async with connect(f"ws://127.0.0.1:{port}/v1/realtime"):
                    break
            except OSError:
                await asyncio.sleep(0.1)
        stats = ProcStats(proc.pid)
        url = f"ws://127.0.0.1:{port}/v1/realtime?model=local"
        one: list = []
        await session(url, utts, one)
        many: list = []
        per = max(1, len(utts) // concurrent)
        await asyncio.gather(*(session(url, utts[k::concurrent][:per] or utts[:per], many) for k in range(concurrent)))
        workers = [pid for pid in stats.pids() if pid != proc.pid]
        rss = {"total_mb": round(stats.rss_mb(), 1), "workers": len(workers),
               "per_worker_mb": sorted(round(ProcStats(p).rss_mb(), 1) for p in workers)}
    finally:
        proc.terminate()
        proc.wait(15)
    return {"one_session_ms": pcts(one), f"{concurrent}_sessions_ms": pcts(many), "rss": rss}


async def run(n_utt: int, concurrent: int) -> dict:
    tmp = Path(tempfile.mkdtemp())
    speech48 = {"piper": clips("piper", 48000, tmp), "espeak": clips("espeak", 48000, tmp)}
    piper24 = clips("piper", 24000, tmp)
    utts = [piper24[i % len(piper24)] for i in range(n_utt)]
    out: dict = {"sentences": len(SENTENCES), "utterances": n_utt, "concurrent": concurrent, "engines": {}}
    for engine in ENGINES:
        print(f"{engine}: word error rate through the bridge", flush=True)
        through = await bridge_wer(engine, speech48)
        print(f"{engine}: latency, 1 and {concurrent} sessions", flush=True)
        lat = await latency(engine, utts, concurrent)
        out["engines"][engine] = {"bridge": through, **lat}
        print(f"  WER piper {through['piper']['wer']} espeak {through['espeak']['wer']}; "
              f"speech_stopped → first audio {lat['one_session_ms']} / {lat[f'{concurrent}_sessions_ms']}; "
              f"RSS {lat['rss']}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utterances", type=int, default=20)
    ap.add_argument("--concurrent", type=int, default=4)
    args = ap.parse_args()
    result = asyncio.run(run(args.utterances, args.concurrent))
    path = write_result("local_backend", result)
    for engine, r in result["engines"].items():
        for voice in ("piper", "espeak"):
            for said, heard in r["bridge"][voice]["misheard"][:3]:
                print(f"  {engine}/{voice}: said {said!r:50} heard {heard!r}")
    print(f"written {path}")
    print(json.dumps({e: {"wer_piper": r["bridge"]["piper"]["wer"], "wer_espeak": r["bridge"]["espeak"]["wer"],
                          "one_session_ms": r["one_session_ms"], "concurrent_ms": r[f"{args.concurrent}_sessions_ms"],
                          "rss": r["rss"]} for e, r in result["engines"].items()}))


if __name__ == "__main__":
    main()
