"""HTTP: every error has OpenAI's shape and the right status, and the server keeps serving."""

from __future__ import annotations

import aiohttp
import pytest

from signaling.routes import MAX_OFFER_BYTES

VALID_OFFER_HEAD = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


async def post(url, body, ctype="application/sdp", headers=None):
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=body, headers={"Content-Type": ctype, **(headers or {})}) as r:
            return r.status, await r.json(content_type=None), r.headers


def assert_error(status, body, want_status, want_code):
    assert status == want_status, body
    assert set(body["error"]) >= {"type", "code", "message"}
    assert body["error"]["code"] == want_code
    assert body["error"]["message"]


@pytest.mark.parametrize("sdp, fragment", [
    ("hello", "not an SDP offer"),
    ("", "empty"),
    (VALID_OFFER_HEAD + "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\n", "no audio m-line"),
    (VALID_OFFER_HEAD + "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=rtpmap:0 PCMU/8000\r\n", "Opus"),
    (VALID_OFFER_HEAD + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n", "no DTLS fingerprint"),
    (VALID_OFFER_HEAD + "a=fingerprint:sha-256 AB:CD\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n",
     "no ICE credentials"),
    (VALID_OFFER_HEAD + "a=fingerprint:sha-256 AB:CD\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n"
     "a=ice-ufrag:abcd\r\na=ice-pwd:0123456789abcdef0123456789\r\na=setup:bogus\r\n", "Could not apply"),
])
async def test_bad_offers_get_400_with_a_precise_message(bridge, sdp, fragment):
    status, body, _ = await post(bridge.url + "/v1/realtime/calls", sdp)
    assert_error(status, body, 400, "invalid_offer")
    assert fragment in body["error"]["message"]
    assert body["error"]["param"] == "sdp"
    await bridge.wait_no_calls()


async def test_an_oversized_body_gets_413(bridge):
    status, body, _ = await post(bridge.url + "/v1/realtime/calls", "v=0\r\n" + "a" * MAX_OFFER_BYTES)
    assert_error(status, body, 413, "body_too_large")


async def test_a_wrong_content_type_gets_415(bridge):
    status, body, _ = await post(bridge.url + "/v1/realtime/calls", "v=0", ctype="text/plain")
    assert_error(status, body, 415, "unsupported_media_type")
    assert "text/plain" in body["error"]["message"]


async def test_json_bodies_are_checked(bridge):
    status, body, _ = await post(bridge.url + "/v1/realtime/calls", "{oops", ctype="application/json")
    assert_error(status, body, 400, "invalid_json")
    status, body, _ = await post(bridge.url + "/v1/realtime/calls", '{"type":"offer"}', ctype="application/json")
    assert_error(status, body, 400, "missing_required_parameter")


async def test_hanging_up_an_unknown_call_gets_404(bridge):
    status, body, _ = await post(bridge.url + "/v1/realtime/calls/rtc_nope/hangup", "")
    assert_error(status, body, 404, "call_not_found")


async def test_unknown_routes_and_methods_answer_in_the_same_shape(bridge):
    async with aiohttp.ClientSession() as http:
        async with http.get(bridge.url + "/nope") as r:
            assert_error(r.status, await r.json(), 404, "not_found")
        async with http.delete(bridge.url + "/v1/realtime/calls") as r:
            assert_error(r.status, await r.json(), 405, "method_not_allowed")


async def test_calls_over_the_limit_get_503_and_the_server_keeps_serving(stub, start_bridge, new_caller):
    bridge = await start_bridge(stub.url, max_calls="1")
    first = new_caller(bridge.url)
    await first.connect()
    second = new_caller(bridge.url)
    with pytest.raises(RuntimeError, match="503"):
        await second.connect()
    assert await first.hangup() == 200
    await bridge.wait_no_calls()
    third = new_caller(bridge.url)
    await third.connect()  # a slot is free again
    async with aiohttp.ClientSession() as http:
        async with http.get(bridge.url + "/healthz") as r:
            health = await r.json()
    assert health["status"] == "ok" and health["active_calls"] == 1 and health["max_calls"] == 1


async def test_json_offers_get_a_json_answer_with_the_call_id(bridge, new_caller):
    c = new_caller(bridge.url)
    c.pc.addTrack(c.source)
    c.pc.createDataChannel("oai-events")
    await c.pc.setLocalDescription(await c.pc.createOffer())
    status, body, headers = await post(bridge.url + "/v1/realtime/calls",
                                       f'{{"type":"offer","sdp":{__import__("json").dumps(c.pc.localDescription.sdp)}}}',
                                       ctype="application/json")
    assert status == 201 and body["type"] == "answer" and body["sdp"].startswith("v=0")
    assert headers["Location"] == f"/v1/realtime/calls/{body['call_id']}"


async def test_the_answer_is_sendrecv_for_audio(bridge, new_caller):
    c = new_caller(bridge.url)
    await c.connect()
    audio = c.pc.remoteDescription.sdp.split("m=audio", 1)[1].split("m=", 1)[0]
    assert "a=sendrecv" in audio


async def test_cors_preflight_is_answered_for_configured_origins_only(stub, start_bridge):
    bridge = await start_bridge(stub.url, cors_origins="https://app.example.com")
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
    async with aiohttp.ClientSession() as http:
        async with http.options(bridge.url + "/v1/realtime/calls",
                                headers={"Origin": "https://app.example.com", **preflight}) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
            allowed = r.headers["Access-Control-Allow-Headers"].lower()
            assert "authorization" in allowed and "content-type" in allowed and "x-stainless-os" in allowed
            assert "Location" in r.headers["Access-Control-Expose-Headers"]
        async with http.options(bridge.url + "/v1/realtime/calls",
                                headers={"Origin": "https://evil.example.com", **preflight}) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
            assert (await r.json())["error"]["code"] == "origin_not_allowed"


async def test_the_page_is_served(bridge):
    async with aiohttp.ClientSession() as http:
        async with http.get(bridge.url + "/") as r:
            assert r.status == 200 and "<audio" in await r.text()
        async with http.get(bridge.url + "/client/app.js") as r:
            assert r.status == 200 and "oai-events" in await r.text()
        async with http.get(bridge.url + "/config.json") as r:
            assert (await r.json()) == {"ice_servers": [], "opus_dtx": "auto", "reconnect_grace_seconds": 20.0}


async def test_metrics_report_calls_loop_lag_and_audio_health(bridge, new_caller):
    c = new_caller(bridge.url)
    c.source.freq = 440
    await c.connect()
    import asyncio
    await asyncio.sleep(0.5)
    async with aiohttp.ClientSession() as http:
        async with http.get(bridge.url + "/metrics.json") as r:
            m = await r.json()
    assert m["active_calls"] == 1
    assert m["mic"]["frames"] > 5 and m["playback"]["frames"] > 5
    assert set(m["loop_lag_ms"]) == {"p50", "p95", "p99", "max"}
    assert {"packets", "red_recovered", "fec_recovered", "concealed", "late"} <= set(m["mic"])
    assert m["downlink"]["packets"] > 5 and "browser_fraction_lost" in m["downlink"]
    assert set(m["mic_hold_ms"]) == {"p50", "p95", "p99", "max"}
    assert m["process"]["threads"] > 0 and m["process"]["rss_mb"] > 0


async def test_with_an_auth_token_calls_need_the_token_or_a_minted_ephemeral_key(stub, start_bridge, new_caller):
    bridge = await start_bridge(stub.url, auth_token="s3cret-operator-token")
    url = bridge.url + "/v1/realtime/calls"
    status, body, headers = await post(url, "v=0", headers={"Authorization": "Bearer wrong"})
    assert_error(status, body, 401, "invalid_api_key")
    assert headers["WWW-Authenticate"] == "Bearer"
    # minting needs the operator's token
    status, body, _ = await post(bridge.url + "/v1/realtime/client_secrets", "{}", ctype="application/json")
    assert_error(status, body, 401, "invalid_api_key")
    status, body, _ = await post(bridge.url + "/v1/realtime/client_secrets",
                                 '{"expires_after":{"anchor":"created_at","seconds":5}}', ctype="application/json",
                                 headers={"Authorization": "Bearer s3cret-operator-token"})
    assert_error(status, body, 400, "invalid_value")
    status, minted, _ = await post(bridge.url + "/v1/realtime/client_secrets",
                                   '{"session":{"type":"realtime","instructions":"from the key"}}',
                                   ctype="application/json", headers={"Authorization": "Bearer s3cret-operator-token"})
    assert status == 200 and minted["value"].startswith("ek_") and minted["expires_at"] > 0
    # a browser with the ephemeral key gets its call, configured by the key's session
    c = new_caller(bridge.url)
    c.pc.addTrack(c.source)
    c.pc.createDataChannel("oai-events")
    await c.pc.setLocalDescription(await c.pc.createOffer())
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=c.pc.localDescription.sdp, headers={
                "Content-Type": "application/sdp", "Authorization": f"Bearer {minted['value']}"}) as r:
            assert r.status == 201
    session = await stub.wait_session()
    import asyncio
    for _ in range(100):
        if len(session.events_of("session.update")) == 2:
            break
        await asyncio.sleep(0.02)
    assert session.events_of("session.update")[1]["session"]["instructions"] == "from the key"
    assert "s3cret" not in str(session.events_of("session.update"))


async def test_firefox_s_own_offer_is_answered_with_candidates_opus_and_fec_and_no_red(bridge):
    """The offer Firefox 153 (firefox-esr, default settings) made on this machine: mDNS host
    candidates only, Opus at payload type 109, no RED, G.722, telephone-event."""
    from pathlib import Path

    offer = (Path(__file__).parent / "sdp" / "firefox-153-offer.sdp").read_text().replace("\n", "\r\n")
    async with aiohttp.ClientSession() as http:
        async with http.post(bridge.url + "/v1/realtime/calls", data=offer,
                             headers={"Content-Type": "application/sdp"}) as r:
            assert r.status == 201, await r.text()
            answer = await r.text()
            call_id = r.headers["Location"].rsplit("/", 1)[-1]
        lines = answer.splitlines()
        audio = next(line for line in lines if line.startswith("m=audio")).split()
        assert audio[3] == "109" and "red/" not in answer.lower()  # Opus first; no RED offered, none answered
        assert "a=fmtp:109 minptime=10;useinbandfec=1" in answer  # FEC asked of Firefox's encoder
        assert "maxplaybackrate" not in answer  # (Firefox's remoteDescription shows "=0": its own default)
        assert [line for line in lines if line.startswith("a=candidate:")]  # where Firefox's checks go
        async with http.post(f"{bridge.url}/v1/realtime/calls/{call_id}/hangup") as r:
            assert r.status in (200, 204)
    await bridge.wait_no_calls()
