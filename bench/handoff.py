"""What an upstream handoff costs the caller: the gap in the caller's audio reaching the model.

`server.py` runs in its own process; the Realtime stub (harness/stub.py) and one aiortc
caller sending a continuous tone run here. Each trial ends the current upstream session
and measures, at the stub, the time between the last audio append the old session got
and the first the new one got (the caller's audio is queued for the new session, so
"gap" is delay, not loss), and how much of the caller's audio went missing across it.

- unplanned: the stub closes the session with 1001 ("maximum duration"), as OpenAI does;
- planned: `--upstream-session-lifetime` runs out between turns and the bridge moves first.

    python bench/handoff.py [--trials 10]

Writes bench/results/handoff.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ONE_ADDRESS, RESULTS, free_port, pcts, start_process, wait_http, write_result  # noqa: E402
from harness.caller import Caller  # noqa: E402
from harness.stub import RealtimeStub  # noqa: E402

BYTES_PER_S = 24000 * 2


async def _wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.005)


def _measure(old, new, t_from: float, t_to: float) -> dict:
    last_old = old.audio_arrivals[-1][0]
    first_new = new.audio_arrivals[0][0]
    # audio the model got over [t_from, t_to] across both sessions, against the time that passed
    got = (sum(n for t, n in _deltas(old.audio_arrivals) if t_from <= t <= t_to)
           + sum(n for t, n in _deltas(new.audio_arrivals) if t_from <= t <= t_to))
    return {"gap_ms": round((first_new - last_old) * 1000, 1),
            "audio_missing_ms": round(max(0.0, (t_to - t_from) - got / BYTES_PER_S) * 1000, 1)}


def _deltas(arrivals):
    prev = 0
    for t, total in arrivals:
        yield t, total - prev
        prev = total


async def run(mode: str, trials: int) -> dict:
    async with RealtimeStub() as stub:
        port = free_port()
        args = ["server.py", *ONE_ADDRESS, "--port", str(port), "--realtime-url", stub.url, "--log-level", "WARNING",
                "--env-file", "/nonexistent"]
        if mode == "planned":
            args += ["--upstream-session-lifetime", "4"]
        srv = start_process(args, log=RESULTS / f"bridge_handoff_{mode}.log")
        rows = []
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz")
            caller = Caller(f"http://127.0.0.1:{port}", keep_audio=False)
            caller.source.freq = 300
            await caller.connect()
            await _wait(lambda: stub.sessions and len(stub.sessions[-1].audio) > BYTES_PER_S, 10)
            for trial in range(trials):
                old = stub.sessions[-1]
                n = len(stub.sessions)
                t_from = time.monotonic()
                await asyncio.sleep(1.0)
                if mode == "unplanned":
                    await old.ws.close(1001, "Your session hit the maximum duration of 60 minutes.")
                await _wait(lambda: len(stub.sessions) > n and stub.sessions[-1].audio_arrivals, 15)
                await asyncio.sleep(1.0)
                new = stub.sessions[-1]
                row = _measure(old, new, t_from, time.monotonic() - 0.1)
                rows.append(row)
                print(f"  {mode} {trial}: gap {row['gap_ms']} ms, audio missing {row['audio_missing_ms']} ms", flush=True)
            await caller.hangup()
            await caller.close()
        finally:
            srv.terminate()
            srv.wait(15)
    return {"trials": rows, "gap_ms": pcts(r["gap_ms"] for r in rows),
            "audio_missing_ms": pcts(r["audio_missing_ms"] for r in rows)}


async def main(trials: int) -> dict:
    return {"unplanned_1001": await run("unplanned", trials), "planned_lifetime": await run("planned", trials)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=10)
    args = ap.parse_args()
    out = asyncio.run(main(args.trials))
    for key in ("unplanned_1001", "planned_lifetime"):
        print(key, {k: v for k, v in out[key].items() if k != "trials"})
    print(f"wrote {write_result('handoff', out)}")
