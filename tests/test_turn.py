"""TURN for networks that block UDP: the bridge mints TURN REST credentials for each page,
and Chromium in a namespace whose UDP is all dropped (nftables) connects through a real
coturn over TCP; the model hears it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import shutil
import time

import aiohttp
import numpy as np
import pytest

from harness.browser import launch, start_call
from harness.coturn import Coturn
from harness.netns import LossyLink
from harness.speech import speech_wav
from harness.stub import RealtimeStub
from tests.conftest import eventually

SECRET = "coturn-shared-secret-for-tests"

SELECTED_PAIR_JS = """async () => {
  const stats = await window.bridge.pc.getStats();
  let pair = null;
  stats.forEach((r) => { if (r.type === 'transport' && r.selectedCandidatePairId) pair = stats.get(r.selectedCandidatePairId); });
  if (!pair) return null;
  const local = stats.get(pair.localCandidateId);
  return {type: local.candidateType, relayProtocol: local.relayProtocol || null};
}"""


async def test_config_json_gives_each_page_fresh_turn_rest_credentials(stub, start_bridge):
    bridge = await start_bridge(stub.url, turn_host="turn.example.com", turn_secret=SECRET, turn_ttl="600")
    async with aiohttp.ClientSession() as http:
        async with http.get(bridge.url + "/config.json") as r:
            first = (await r.json())["ice_servers"][0]
        async with http.get(bridge.url + "/config.json") as r:
            second = (await r.json())["ice_servers"][0]
    assert first["urls"] == ["turn:turn.example.com:3478?transport=udp", "turn:turn.example.com:3478?transport=tcp",
                             "turns:turn.example.com:443?transport=tcp"]
    expiry = int(first["username"].split(":")[0])
    assert 590 <= expiry - time.time() <= 610
    # coturn's check: the password is base64(HMAC-SHA1(secret, username))
    want = base64.b64encode(hmac.new(SECRET.encode(), first["username"].encode(), hashlib.sha1).digest()).decode()
    assert first["credential"] == want and first["username"] != second["username"]
    assert SECRET not in str(first)


WHY_NOT = ("needs Debian's chromium (./test.sh installs it)" if not shutil.which("chromium")
           else LossyLink.unavailable() or Coturn.unavailable())


@pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")
async def test_a_browser_whose_udp_is_blocked_connects_through_turn_over_tcp(tmp_path, start_bridge):
    from playwright.async_api import async_playwright

    mic = speech_wav("Hello there, can you hear me through the relay?", tmp_path / "mic.wav", pad_s=0.3)
    with LossyLink(name="rttestturn", subnet="10.208.0") as link:
        link.set_loss(100, 100)  # every UDP packet between the browser and this side dropped, both ways
        with Coturn(link.host_ip, SECRET):
            async with RealtimeStub() as stub:
                bridge = await start_bridge(
                    stub.url, host=link.host_ip, turn_secret=SECRET,
                    turn_urls=f"turn:{link.host_ip}:3478?transport=udp,turn:{link.host_ip}:3478?transport=tcp")
                async with async_playwright() as p:
                    browser = await launch(p, mic, link=link, origin=bridge.url)
                    page = await start_call(browser, bridge.url, timeout_s=30)
                    session = await stub.wait_session()
                    await eventually(lambda: len(session.audio) > 24000 * 2 * 2, 15, "two seconds of caller audio")
                    pair = await page.evaluate(SELECTED_PAIR_JS)
                    await browser.close()
    assert pair == {"type": "relay", "relayProtocol": "tcp"}, pair
    heard = np.frombuffer(bytes(session.audio), dtype="<i2").astype(float) / 32768
    assert np.sqrt(np.mean(heard ** 2)) > 0.01  # the caller's speech, not silence
