"""Browser end-to-end under real packet loss: Chromium (and Firefox) in its own network namespace,
nftables dropping 10 % of the UDP packets each way, the real page, the real bridge.

It checks what the issue of loss is about, as the browser and the model see it:
FEC and RED are negotiated, Chromium really sends them, every hole in the caller's
audio is rebuilt (no frame of zeros reaches the model), and Chromium's own stats
show it receiving our redundancy and concealing little.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest

from harness.browser import answer_audio_lines, audio_stats, launch, start_call
from harness.netns import LossyLink
from harness.stub import RealtimeStub
from media.audio import FRAME_BYTES
from harness.speech import speech_wav

WHY_NOT = "needs Debian's chromium (./test.sh installs it)" if not shutil.which("chromium") else LossyLink.unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


def _concealed(before: dict, after: dict) -> float:
    """The share of the samples played while the answer played that the browser made up."""
    return ((after["concealedSamples"] - before["concealedSamples"])
            / (after["totalSamplesReceived"] - before["totalSamplesReceived"]))


@pytest.fixture
def link():
    with LossyLink(name="rttestloss", subnet="10.205.0") as lossy:
        yield lossy


async def test_through_10_percent_loss_each_way_red_and_fec_are_sent_and_no_hole_reaches_the_model(link, tmp_path,
                                                                                                   start_bridge):
    from playwright.async_api import async_playwright

    mic = speech_wav("Hello there. What is the weather like today in London? I would like to know if it will rain "
                     "this afternoon, and whether I should take an umbrella.", tmp_path / "mic.wav", pad_s=0.3)
    async with RealtimeStub() as stub:
        bridge = await start_bridge(stub.url, host=link.host_ip)
        url = bridge.url
        async with async_playwright() as p:
            browser = await launch(p, mic, link=link, origin=url)
            page = await start_call(browser, url)
            session = await stub.wait_session()
            link.set_loss(10, 10)
            start = len(session.audio)
            await stub.respond(session, freq=440, ms=9000)  # model audio the browser must hear
            await asyncio.sleep(1)
            answering = (await audio_stats(page))["inbound-rtp"]  # from here on the answer plays
            await asyncio.sleep(9)
            stats = await audio_stats(page)
            call = next(iter(bridge.registry.calls.values()))
            up = call.uplink.stats
            audio = bytes(session.audio[start:])
            await browser.close()
    audio_lines = answer_audio_lines(stats["answer"])
    m_line = audio_lines[0].split()
    assert m_line[3:5] == ["63", "111"], audio_lines  # RED first (Chrome sends RED only then), Opus next
    assert "a=fmtp:63 111/111" in audio_lines
    opus_fmtp = next(line for line in audio_lines if line.startswith("a=fmtp:111 ")).split(" ", 1)[1].split(";")
    assert {"minptime=10", "useinbandfec=1", "maxaveragebitrate=48000"} <= set(opus_fmtp)

    # Uplink: Chromium sends RED and, once our receiver reports show the loss, LBRR.
    assert up.packets > 300 and up.red_packets > 0.95 * up.packets
    assert up.lbrr_packets > 0.2 * up.packets
    assert up.lost > 10  # the loss was real
    assert up.unfilled == 0
    assert up.red_recovered + up.fec_recovered >= 0.7 * up.lost, up
    frames = [audio[i:i + FRAME_BYTES] for i in range(0, len(audio) - FRAME_BYTES + 1, FRAME_BYTES)]
    assert len(frames) > 400 and not [f for f in frames if not any(f)]  # no 20 ms of zeros

    # Downlink: Chromium receives our redundancy and conceals little of what it plays.
    inbound = stats["inbound-rtp"]
    assert inbound["packetsLost"] > 10
    assert inbound["fecPacketsReceived"] > 0
    assert _concealed(answering, inbound) < 0.03, inbound
    assert call.packer.stats.loss_percent >= 5  # FEC sized from the browser's reports


async def test_firefox_through_10_percent_loss_each_way_sends_fec_and_no_hole_reaches_the_model(link, tmp_path,
                                                                                                start_bridge):
    """Firefox offers no RED: the answer is Opus with in-band FEC, which Firefox sends once our
    receiver reports show the loss; what FEC cannot rebuild is concealed, never left as zeros."""
    from harness.browser import open_browser, unavailable

    if unavailable("firefox"):
        pytest.skip(unavailable("firefox"))
    mic = speech_wav("Hello there. What is the weather like today in London? I would like to know if it will rain "
                     "this afternoon, and whether I should take an umbrella.", tmp_path / "mic.wav", pad_s=0.3)
    async with RealtimeStub() as stub:
        bridge = await start_bridge(stub.url, host=link.host_ip)
        url = bridge.url
        async with open_browser("firefox", mic, link=link, origin=url) as browser:
            page = await start_call(browser, url)
            session = await stub.wait_session()
            link.set_loss(10, 10)
            start = len(session.audio)
            await stub.respond(session, freq=440, ms=9000)
            await asyncio.sleep(1)
            answering = (await audio_stats(page))["inbound-rtp"]
            await asyncio.sleep(9)
            stats = await audio_stats(page)
            call = next(iter(bridge.registry.calls.values()))
            up = call.uplink.stats
            audio = bytes(session.audio[start:])
    audio_lines = answer_audio_lines(stats["answer"])
    assert "red/" not in " ".join(audio_lines).lower()  # nothing offered, nothing answered
    assert up.packets > 300 and up.red_packets == 0
    assert up.lbrr_packets > 0.2 * up.packets  # Firefox sends in-band FEC once it hears of the loss
    assert up.lost > 10  # the loss was real
    assert up.fec_recovered >= 0.25 * up.lost, up  # a share rebuilt from FEC (46 % measured), the rest concealed
    assert up.unfilled == 0
    frames = [audio[i:i + FRAME_BYTES] for i in range(0, len(audio) - FRAME_BYTES + 1, FRAME_BYTES)]
    # (Firefox's capture from PulseAudio runs short on a loaded 2-core machine: 360 of 500 seen)
    assert len(frames) > 250 and not [f for f in frames if not any(f)]
    inbound = stats["inbound-rtp"]  # our downlink's FEC reaches Firefox's decoder
    assert inbound["packetsLost"] > 10 and inbound["fecPacketsReceived"] > 0
    assert _concealed(answering, inbound) < 0.03, inbound
