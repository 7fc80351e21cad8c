"""A caller for bench/netns.py, run inside the network namespace:

    python bench/netns_client.py --mode websocket|rtp --url URL --seconds S

Connects, prints READY, waits for GO on stdin (the orchestrator then switches
the packet loss on), streams marker audio for S seconds, prints one JSON line
with the monotonic times the markers were sent, and hangs up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402

from bench.markers import CODES, PERIOD_FRAMES, MarkerSource, marker_frame  # noqa: E402
from harness.caller import Caller  # noqa: E402

logging.getLogger("aioice").setLevel(logging.ERROR)
logging.getLogger("aiortc").setLevel(logging.ERROR)


async def go() -> None:
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def websocket(url: str, seconds: float) -> list[float]:
    """The tutorial design: 20 ms PCM16 frames over one WebSocket (TCP)."""
    sent = []
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url) as ws:
            await go()
            start = time.monotonic()
            n = 0
            while time.monotonic() - start < seconds:
                burst = n % PERIOD_FRAMES == 10
                code = len(sent) % CODES
                await ws.send_bytes(marker_frame(24000, 480, burst, n * 480, code).tobytes())
                if burst:
                    sent.append((time.monotonic(), code))
                n += 1
                await asyncio.sleep(max(0.0, start + n * 0.02 - time.monotonic()))
            await asyncio.sleep(1.0)  # let the last frames through before closing
    return sent


async def rtp(url: str, seconds: float) -> list[float]:
    source = MarkerSource()
    caller = Caller(url, source=source, keep_audio=False)
    await caller.connect()
    for _ in range(500):
        if caller.pc.connectionState == "connected":
            break
        await asyncio.sleep(0.02)
    await go()
    start = time.monotonic()
    await asyncio.sleep(seconds + 1.0)  # markers of the last second get time to arrive
    try:
        await asyncio.wait_for(caller.hangup(), 10)
    except Exception:
        pass
    await caller.close()
    return [(t, c) for t, c in source.sent if start <= t < start + seconds]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["websocket", "rtp"], required=True)
    ap.add_argument("--url", required=True)
    ap.add_argument("--seconds", type=float, default=30)
    args = ap.parse_args()
    sent = asyncio.run((websocket if args.mode == "websocket" else rtp)(args.url, args.seconds))
    print(json.dumps({"sent": sent}), flush=True)


if __name__ == "__main__":
    main()
