"""Browser playout: how much of our downlink each browser holds in its jitter buffer, over
the first seconds of a call, with our downlink sending every 20 ms frame (`OPUS_DTX=off`),
skipping silent ones until the model first speaks (`auto`, the default) or always (`on`).

For each browser (headless Chromium; headless Firefox with a private PulseAudio daemon as
its sound card) and each downlink mode, `--runs` calls: the bridge (in this process, a
Realtime stub upstream) is connected to by the bundled page; after `--quiet-s` of model
silence the stub answers with a 440 Hz tone of `--answer-s`. Every second the page's
`getStats()` gives `jitterBufferDelay` / `jitterBufferEmittedCount` for the last second
(what the browser held each sample it played, on average); and the answer's first
audible sample at the page (`modelLevel > 0.05`, polled every 20 ms) is timed from the
stub sending it.

    python bench/browser_playout.py [--runs 3] [--browsers chromium,firefox]

Writes bench/results/browser_playout.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web  # noqa: E402

import settings as config  # noqa: E402
from bench.common import pcts, write_result  # noqa: E402
from harness.browser import JITTER_JS, jitter_ms, open_browser, unavailable  # noqa: E402
from harness.speech import silence_wav  # noqa: E402
from harness.stub import RealtimeStub  # noqa: E402
from signaling.admission import NEVER  # noqa: E402
from signaling.app import build_app  # noqa: E402
from signaling.routes import ADMISSION  # noqa: E402


async def one_call(browser, stub: RealtimeStub, url: str, quiet_s: float, answer_s: float) -> dict:
    page = await browser.new_page()
    await page.goto(url)
    await page.click("#call")
    await page.wait_for_function("window.bridge.state === 'connected'", timeout=30000)
    session = await stub.wait_session()
    series, prev = [], await page.evaluate(JITTER_JS) or [0, 0]
    connected = time.monotonic()
    answer_at = first_audible = None
    answer = None
    while time.monotonic() - connected < quiet_s + answer_s:
        if answer is None and time.monotonic() - connected >= quiet_s:
            answer_at = time.monotonic()
            answer = asyncio.ensure_future(stub.respond(session, freq=440, ms=int(answer_s * 1000)))
        if answer is not None and first_audible is None and await page.evaluate("window.bridge.modelLevel") > 0.05:
            first_audible = time.monotonic()
        elapsed = time.monotonic() - connected
        if elapsed >= len(series) + 1:
            now = await page.evaluate(JITTER_JS) or [0, 0]
            held = jitter_ms(prev, now)
            series.append(round(held, 1) if held is not None else None)
            prev = now
        await asyncio.sleep(0.02)
    await page.click("#call")
    await page.wait_for_function("window.bridge.state === 'idle'", timeout=10000)
    await answer
    await page.close()
    return {"jitter_buffer_ms_per_second": series,
            "answer_first_audible_ms": round((first_audible - answer_at) * 1000, 1) if first_audible else None}


async def run(args) -> dict:
    out: dict = {"runs": args.runs, "quiet_s": args.quiet_s, "answer_s": args.answer_s, "browsers": {}}
    with tempfile.TemporaryDirectory() as folder:
        mic = silence_wav(Path(folder) / "quiet.wav", 30)
        for name in args.browsers.split(","):
            why_not = unavailable(name)
            if why_not:
                out["browsers"][name] = {"skipped": why_not}
                print(f"{name}: skipped ({why_not})", flush=True)
                continue
            out["browsers"][name] = {}
            for dtx in ("off", "auto", "on"):
                calls = []
                async with RealtimeStub() as stub:
                    settings = config.from_raw({"realtime_url": stub.url, "records_db": str(Path(folder) / "r.db"),
                                                "opus_dtx": dtx})
                    app = build_app(settings, settings.upstream_url())
                    app[ADMISSION].thresholds = NEVER
                    runner = web.AppRunner(app)
                    await runner.setup()
                    await web.TCPSite(runner, "127.0.0.1", 0).start()
                    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
                    try:
                        async with open_browser(name, mic) as browser:
                            for _ in range(args.runs):
                                stub.sessions.clear()
                                calls.append(await one_call(browser, stub, url, args.quiet_s, args.answer_s))
                    finally:
                        await runner.cleanup()
                by_second = [statistics.median([c["jitter_buffer_ms_per_second"][i] for c in calls
                                                if len(c["jitter_buffer_ms_per_second"]) > i
                                                and c["jitter_buffer_ms_per_second"][i] is not None] or [0])
                             for i in range(int(args.quiet_s + args.answer_s) - 1)]  # the last second is cut short
                audible = [c["answer_first_audible_ms"] for c in calls if c["answer_first_audible_ms"] is not None]
                mode = {"off": "every_frame", "auto": "dtx_until_speech", "on": "dtx"}[dtx]
                out["browsers"][name][mode] = {
                    "jitter_buffer_ms_by_second_median": by_second,
                    "jitter_buffer_ms_last_answer_second_median": by_second[-1],
                    "answer_first_audible_ms": pcts(audible), "calls": calls}
                print(f"{name} {mode}: jitter buffer by second (median of {args.runs}) {by_second}; "
                      f"answer first audible p50 {out['browsers'][name][mode]['answer_first_audible_ms'].get('p50')} ms",
                      flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--browsers", default="chromium,firefox")
    parser.add_argument("--quiet-s", type=float, default=3.0)
    parser.add_argument("--answer-s", type=float, default=10.0)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(write_result("browser_playout", result))


if __name__ == "__main__":
    main()
