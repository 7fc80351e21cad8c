"""How fast a call comes back after a network change, as the bundled page does it.

Chromium runs in a network namespace (harness/netns.py), the server (`server.py`) in its
own process on this side of the veth, the Realtime stub in this process. Each trial cuts
the namespace's UDP for `--outage` seconds and gives the browser a new address meanwhile
(Wi-Fi to cellular: its ICE candidates die), then restores the link. Measured from the
moment the link is back:

- `page_connected_s`: the page's re-attached peer reports `connected`;
- `uplink_s`: the caller's audio reaches the model again (first append at the stub);
- `downlink_s`: model audio plays in the page again (a reply is started at the restore;
  the page's output level rises).

    sudo python bench/reconnect.py [--trials 8] [--outage 5]

Writes bench/results/reconnect.json.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ONE_ADDRESS, free_port, pcts, start_process, wait_http, write_result, RESULTS  # noqa: E402
from harness.browser import launch, start_call  # noqa: E402
from harness.netns import LossyLink  # noqa: E402
from harness.speech import speech_wav  # noqa: E402
from harness.stub import RealtimeStub  # noqa: E402


async def _poll(page, js: str, timeout_s: float) -> float:
    """Seconds until `js` is true in the page (polled every 20 ms)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if await page.evaluate(js):
            return time.monotonic() - t0
        await asyncio.sleep(0.02)
    raise TimeoutError(js)


async def main(trials: int, outage: float) -> dict:
    from playwright.async_api import async_playwright

    why = LossyLink.unavailable() or (None if shutil.which("chromium") else "Debian's chromium is not installed")
    if why:
        return {"skipped": why}
    tmp = Path(tempfile.mkdtemp())
    mic = speech_wav("Hello there, can you hear me? I am on the move today.", tmp / "mic.wav", pad_s=0.3)
    rows = []
    with LossyLink(name="rtbenchrec", subnet="10.207.0") as link:
        async with RealtimeStub() as stub:
            stub.realtime_pacing = True
            port = free_port()
            srv = start_process(["server.py", *ONE_ADDRESS, "--host", link.host_ip, "--port", str(port),
                                 "--realtime-url", stub.url, "--log-level", "INFO", "--env-file", "/nonexistent"],
                                log=RESULTS / "bridge_reconnect.log")
            url = f"http://{link.host_ip}:{port}"
            try:
                wait_http(url + "/healthz")
                async with async_playwright() as p:
                    browser = await launch(p, mic, link=link, origin=url)
                    page = await start_call(browser, url)
                    session = await stub.wait_session()
                    await asyncio.sleep(1.0)
                    for trial in range(trials):
                        before = await page.evaluate("window.bridge.reconnects || 0")
                        link.set_loss(100, 100)
                        await asyncio.sleep(outage / 2)
                        link.readdress(7 if trial % 2 == 0 else 2)
                        await asyncio.sleep(outage / 2)
                        await page.evaluate("window.bridge.modelPeak = 0")
                        heard = len(session.audio_arrivals)
                        link.set_loss(0, 0)
                        restored = time.monotonic()
                        reply = asyncio.create_task(stub.respond(session, freq=440, ms=2500, text="Back again."))
                        connected = await _poll(page, f"window.bridge.state === 'connected' && "
                                                      f"(window.bridge.reconnects || 0) > {before}", 20)
                        down = await _poll(page, "window.bridge.modelPeak > 0.01", 20) + connected
                        while len(session.audio_arrivals) <= heard:
                            await asyncio.sleep(0.01)
                        first_up = next(t for t, _ in session.audio_arrivals[heard:] if t >= restored)
                        up = max(0.0, first_up - restored)
                        await reply
                        rows.append({"trial": trial, "page_connected_s": round(connected, 3),
                                     "uplink_s": round(up, 3), "downlink_s": round(down, 3)})
                        print(f"  trial {trial}: connected {connected:.2f} s, uplink {up:.2f} s, downlink {down:.2f} s",
                              flush=True)
                        await asyncio.sleep(1.5)
                    await browser.close()
            finally:
                srv.terminate()
                srv.wait(15)
    return {"trials": rows, "outage_s": outage,
            "page_connected_s": pcts((r["page_connected_s"] for r in rows), 3),
            "uplink_s": pcts((r["uplink_s"] for r in rows), 3),
            "downlink_s": pcts((r["downlink_s"] for r in rows), 3),
            "upstream_sessions": len(stub.sessions)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--outage", type=float, default=5.0, help="seconds the link is down")
    args = ap.parse_args()
    out = asyncio.run(main(args.trials, args.outage))
    print({k: v for k, v in out.items() if k != "trials"})
    print(f"wrote {write_result('reconnect', out)}")
