"""Local backend latency: speech_stopped → first response.output_audio.delta.

Streams espeak-ng utterances in real time (20 ms appends) to `python -m localrt`
running in its own process, over a real WebSocket, 1 session and then N
concurrent sessions. Prints a table and writes bench/results/local_backend.json.

    python bench/local_backend.py [--utterances 20] [--concurrent 4]
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

from bench.common import free_port, pcts, start_process, write_result  # noqa: E402
from realtime import events  # noqa: E402
from realtime.events import Server  # noqa: E402
from harness.speech import read_pcm, speech_wav  # noqa: E402

SENTENCES = [
    "What is the weather like today?",
    "Please tell me a story about a dragon.",
    "How far away is the moon?",
    "Good morning, how are you?",
    "Can you help me cook dinner tonight?",
]


async def session(url: str, utterances: list[tuple[str, bytes]], results: list, transcripts: list) -> None:
    async with connect(url, max_size=None) as ws:
        await ws.recv()  # session.created
        await ws.send(events.dumps(events.session_update({"type": "realtime", "audio": {"input": {
            "transcription": {"model": "local"},
            "turn_detection": {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 500}}}})))
        queue: asyncio.Queue = asyncio.Queue()

        async def reader():
            async for message in ws:
                event = json.loads(message)
                queue.put_nowait((time.monotonic(), event))

        read_task = asyncio.ensure_future(reader())
        try:
            for text, pcm in utterances:
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
                    elif kind == Server.INPUT_TRANSCRIPTION_COMPLETED:
                        transcripts.append((text, event["transcript"]))
                    elif kind == Server.OUTPUT_AUDIO_DELTA and stopped_at is not None:
                        results.append((at - stopped_at) * 1000)
                        stopped_at = None
                    elif kind == Server.RESPONSE_DONE:
                        break
        finally:
            read_task.cancel()


def word_recall(pairs: list[tuple[str, str]]) -> float:
    hit = total = 0
    for said, heard in pairs:
        words = [w.strip(".,?!").lower() for w in said.split()]
        got = set(heard.lower().split())
        hit += sum(w in got for w in words)
        total += len(words)
    return round(hit / max(1, total), 3)


async def run(n_utt: int, concurrent: int) -> dict:
    tmp = Path(tempfile.mkdtemp())
    clips = []
    for i, text in enumerate(SENTENCES):
        pcm, _ = read_pcm(speech_wav(text, tmp / f"s{i}.wav", rate=24000, pad_s=1.2))
        clips.append((text, pcm))
    utts = [clips[i % len(clips)] for i in range(n_utt)]
    port = free_port()
    proc = start_process(["-m", "localrt", "--port", str(port), "--log-level", "WARNING"])
    try:
        for _ in range(100):
            try:
                async with connect(f"ws://127.0.0.1:{port}/v1/realtime"):
                    break
            except OSError:
                await asyncio.sleep(0.1)
        url = f"ws://127.0.0.1:{port}/v1/realtime?model=local"
        one, t1 = [], []
        await session(url, utts, one, t1)
        many, tn = [], []
        per = max(1, n_utt // concurrent)
        await asyncio.gather(*(session(url, utts[k::concurrent][:per] or utts[:per], many, tn) for k in range(concurrent)))
    finally:
        proc.terminate()
        proc.wait(10)
    return {"one_session_ms": pcts(one), f"{concurrent}_sessions_ms": pcts(many),
            "word_recall_one": word_recall(t1), "word_recall_concurrent": word_recall(tn),
            "examples": t1[:5], "utterances": n_utt, "concurrent": concurrent}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utterances", type=int, default=20)
    ap.add_argument("--concurrent", type=int, default=4)
    args = ap.parse_args()
    result = asyncio.run(run(args.utterances, args.concurrent))
    path = write_result("local_backend", result)
    print(f"speech_stopped → first audio delta, 1 session:  {result['one_session_ms']}")
    print(f"speech_stopped → first audio delta, {args.concurrent} sessions: {result[f'{args.concurrent}_sessions_ms']}")
    print(f"word recall (pocketsphinx on espeak-ng speech): {result['word_recall_one']} / {result['word_recall_concurrent']}")
    for said, heard in result["examples"]:
        print(f"  said {said!r:45} heard {heard!r}")
    print(f"written {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}))


if __name__ == "__main__":
    main()
