"""The bundled page survives a network change: Chromium or Firefox in a network namespace whose UDP
is cut for 5 s while its address changes (Wi-Fi to cellular); the page re-attaches by
itself with a new peer and the conversation goes on."""

from __future__ import annotations

import asyncio
import time

import pytest

from harness.browser import BROWSERS, open_browser, start_call, unavailable, until
from harness.netns import LossyLink
from harness.speech import speech_wav
from harness.stub import RealtimeStub

pytestmark = pytest.mark.skipif(LossyLink.unavailable() is not None, reason=LossyLink.unavailable() or "")

CAPTIONS_JS = "() => [...document.querySelectorAll('.caption.assistant')].map((e) => e.innerText)"


@pytest.mark.parametrize("browser_name", BROWSERS)
async def test_the_page_re_attaches_after_its_link_drops_for_5_s_and_the_conversation_goes_on(browser_name, tmp_path,
                                                                                              start_bridge):
    if unavailable(browser_name):
        pytest.skip(unavailable(browser_name))
    mic = speech_wav("Hello there, can you hear me?", tmp_path / "mic.wav", pad_s=0.3)
    with LossyLink(name="rttestrec", subnet="10.206.0") as link:
        async with RealtimeStub() as stub:
            bridge = await start_bridge(stub.url, host=link.host_ip, reconnect_grace="20")
            url = bridge.url
            async with open_browser(browser_name, mic, link=link, origin=url) as browser:
                page = await start_call(browser, url)
                session = await stub.wait_session()
                await stub.respond(session, freq=440, ms=1500, text="First answer before the break.")
                await until(page, "window.bridge.modelPeak > 0.01", 10)
                call = next(iter(bridge.registry.calls.values()))

                link.set_loss(100, 100)  # the network goes: every UDP packet dropped, both ways
                await asyncio.sleep(2.5)
                link.readdress(7)  # and comes back as another network: the old ICE path is dead
                await asyncio.sleep(2.5)
                assert call.held_since is not None and call.reason is None  # held, not ended
                shown = await page.evaluate("() => { const b = document.getElementById('banner'); "
                                            "return {hidden: b.hidden, text: b.innerText, role: b.getAttribute('role')}; }")
                assert not shown["hidden"] and "Reconnecting" in shown["text"] and shown["role"] == "status", shown
                link.set_loss(0, 0)
                restored = time.monotonic()
                await until(page, "window.bridge.state === 'connected' && window.bridge.reconnects >= 1", 20)
                await page.evaluate("window.bridge.modelPeak = 0")
                await stub.respond(session, freq=660, ms=1500, text="Second answer after the break.")
                await until(page, "window.bridge.modelPeak > 0.01", 10)
                back_in = time.monotonic() - restored
                await until(page, "[...document.querySelectorAll('.caption.assistant')].length >= 2", 10)
                captions = await page.evaluate(CAPTIONS_JS)
    assert len(stub.sessions) == 1  # one upstream session throughout
    assert call.reattaches >= 1
    assert "First answer" in captions[0] and "Second answer" in captions[-1]  # in order
    assert back_in < 15, back_in
