"""The page on phones: Chromium emulating an Android phone, an iPhone-sized screen and a
360 px-wide one (touch, mobile viewport, device pixel ratio, the phone's user agent), tapping
through a real call to the real bridge. What a person holding the phone needs: everything
fits the width, the call button is big and within the thumb's reach at the bottom, the
network's quality is shown at a glance (and to a screen reader), the controls have labels."""

from __future__ import annotations

import shutil

import pytest

from harness.browser import CHROMIUM, caption_js, chromium_args
from harness.speech import speech_wav
from harness.stub import RealtimeStub

pytestmark = pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (./test.sh installs it)")

PHONES = {
    "android": "Pixel 7",
    "iphone-sized": "iPhone 13",  # WebKit's screen and user agent, Chromium's engine (no WebRTC in WebKitGTK here)
    "360px": {"viewport": {"width": 360, "height": 740}, "device_scale_factor": 3, "is_mobile": True,
              "has_touch": True},
}

LAYOUT_JS = """() => {
  const box = (id) => { const r = document.getElementById(id).getBoundingClientRect();
                        return {x: r.x, y: r.y, w: r.width, h: r.height}; };
  return {width: innerWidth, height: innerHeight, scroll: document.scrollingElement.scrollWidth,
          call: box('call'), net: box('net'), netHidden: document.getElementById('net').hidden};
}"""

LABELS_JS = """() => ({
  meters: [...document.querySelectorAll('meter')].map((m) => m.getAttribute('aria-label')),
  captions: document.getElementById('captions').getAttribute('aria-live'),
  state: document.getElementById('state').getAttribute('role'),
  net: [document.getElementById('net').getAttribute('role'), document.getElementById('net').getAttribute('aria-label')],
})"""


@pytest.mark.parametrize("phone", PHONES)
async def test_on_a_phone_the_call_fits_one_hand_and_shows_the_network(phone, start_bridge, tmp_path):
    from playwright.async_api import async_playwright

    mic = speech_wav("Hello there. What is the weather like today?", tmp_path / "mic.wav", pad_s=3.0)
    async with RealtimeStub(auto=True, reply_ms=1500, reply_text="I hear you on your phone.",
                            user_text="hello there what is the weather") as stub:
        bridge = await start_bridge(stub.url)
        async with async_playwright() as p:
            device = PHONES[phone]
            if isinstance(device, str):
                device = {k: v for k, v in p.devices[device].items() if k != "default_browser_type"}
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=chromium_args(mic), headless=True)
            try:
                context = await browser.new_context(**device)
                page = await context.new_page()
                await page.goto(bridge.url)
                labels = await page.evaluate(LABELS_JS)
                assert all(labels["meters"]) and labels["captions"] == "polite" and labels["state"] == "status"
                assert labels["net"][0] == "status" and labels["net"][1]
                before = await page.evaluate(LAYOUT_JS)
                await page.tap("#call")
                await page.wait_for_function("window.bridge.state === 'connected'", timeout=30000)
                await page.wait_for_function(caption_js("assistant", "on your phone"), timeout=30000)
                await page.wait_for_function("window.bridge.quality && window.bridge.quality.rtt_ms !== null",
                                             timeout=10000)
                layout = await page.evaluate(LAYOUT_JS)
                quality = await page.evaluate("window.bridge.quality")
                net_text = await page.evaluate("document.getElementById('net').innerText")
                net_label = await page.evaluate("document.getElementById('net').getAttribute('aria-label')")
                await page.tap("#call")
                await page.wait_for_function("window.bridge.state === 'idle'", timeout=10000)
                await bridge.wait_no_calls()
            finally:
                await browser.close()
    for seen in (before, layout):
        assert seen["scroll"] <= seen["width"], seen  # nothing wider than the screen
        call = seen["call"]
        assert call["h"] >= 48 and call["w"] >= 0.8 * seen["width"], seen  # a big target, the whole width
        assert call["y"] >= seen["height"] / 2 and call["y"] + call["h"] <= seen["height"], seen  # where the thumb is
    assert not layout["netHidden"] and layout["net"]["w"] > 0
    assert quality["level"] == "good" and quality["loss_down_pct"] == 0 and 0 <= quality["rtt_ms"] < 100, quality
    assert "good" in net_text.lower() and "ms" in net_text, net_text
    assert "round trip" in net_label and "lost" in net_label, net_label
