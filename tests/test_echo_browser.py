"""The echo guard with a real browser whose echo canceller does not work: headless Firefox
capturing without its canceller (and noise suppression and gain control) although the page
asks for them, its speaker looped
back into its microphone 150 ms later at -6 dB (PulseAudio's module-loopback), talking to the
embedded local backend, whose VAD decides barge-in. Without the guard the model hears
itself and stops; with it, the model finishes what it says."""

from __future__ import annotations

import asyncio
import json
import wave

import pytest
from aiohttp import web

import settings as config
from harness.browser import open_browser, settle_playout, unavailable
from harness.pulse import PulseAudio
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


def _silence(path, seconds: float = 10.0) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(b"\0\0" * int(48000 * seconds))


def _events_js(kind: str, since: int) -> str:
    return f"window.bridge.events.slice({since}).filter((e) => e.type === {json.dumps(kind)}).length"


@pytest.mark.parametrize("guard", ["off", "auto"])
async def test_firefox_on_speaker_without_its_canceller_does_not_interrupt_the_model(start_bridge, tmp_path, guard):
    local = web.AppRunner(build_local_app(config.from_raw({})))
    await local.setup()
    await web.TCPSite(local, "127.0.0.1", 0).start()
    mic = tmp_path / "quiet.wav"
    _silence(mic)
    pulse = PulseAudio().start()
    try:
        pulse.echo(delay_ms=150, gain_db=-6)
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
            await page.wait_for_function(_events_js("output_audio_buffer.started", since) + " > 0", timeout=30000)
            if guard == "off":
                # the loop is real: the model hears itself through Firefox and stops
                await page.wait_for_function(_events_js("input_audio_buffer.speech_started", since) + " > 0",
                                             timeout=15000)
                return
            await page.wait_for_function(_events_js("output_audio_buffer.stopped", since) + " > 0", timeout=60000)
            await asyncio.sleep(1.0)  # the echo's tail
            assert await page.evaluate(_events_js("input_audio_buffer.speech_started", since)) == 0
            assert await page.evaluate(_events_js("output_audio_buffer.cleared", since)) == 0
            call = next(iter(bridge.registry.calls.values()))
            assert call.echo.stats.detected, call.echo.stats
            assert await page.evaluate("window.bridge.modelPeak") > 0.05  # the model was heard, in full
    finally:
        pulse.stop()
        await local.cleanup()
