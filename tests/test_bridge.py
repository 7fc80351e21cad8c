"""Integration: a real aiortc caller ↔ the real bridge ↔ a real WebSocket Realtime stub."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from media.audio import FRAME_BYTES, REALTIME_RATE, dominant_frequency, rms_dbfs
from tests.conftest import connected_call, eventually

RTP_RATE = 48000


def tone_ms(pcm48: bytes, threshold_dbfs: float = -40) -> int:
    """Milliseconds of non-silent 10 ms blocks in 48 kHz mono PCM."""
    block = 960  # 10 ms at 48 kHz, in bytes
    return sum(10 for i in range(0, len(pcm48) - block + 1, block) if rms_dbfs(pcm48[i:i + block]) > threshold_dbfs)


async def test_the_session_is_configured_for_24k_pcm_and_the_page_sees_created_then_updated(bridge, stub, new_caller):
    caller, session = await connected_call(bridge, stub, new_caller)
    update = session.events_of("session.update")[0]["session"]
    assert update["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert update["audio"]["input"]["turn_detection"]["threshold"] == 0.55
    kinds = [e["type"] for e in caller.events]
    assert kinds.index("session.created") < kinds.index("session.updated")


async def test_a_tone_from_the_caller_arrives_upstream_at_24k_with_the_right_frequency(bridge, stub, new_caller):
    caller, session = await connected_call(bridge, stub, new_caller, freq=1000)
    await eventually(lambda: len(session.audio) >= 2 * REALTIME_RATE * 2, what="2 s of audio upstream")
    steady = bytes(session.audio[REALTIME_RATE:2 * REALTIME_RATE * 2])
    assert abs(dominant_frequency(steady) - 1000) < 2
    assert rms_dbfs(steady) > -20  # a 0.3 amplitude tone is ≈ -13.5 dBFS; Opus keeps it
    # one append per 20 ms frame, each exactly 480 samples after warm-up
    sizes = np.diff([n for _, n in session.audio_arrivals])[5:50]
    assert set(sizes.tolist()) == {FRAME_BYTES}


async def test_model_audio_deltas_reach_the_caller_with_the_right_frequency_and_level(bridge, stub, new_caller):
    caller, session = await connected_call(bridge, stub, new_caller)
    await stub.respond(session, freq=600, ms=1500)
    await eventually(lambda: tone_ms(bytes(caller.audio)) >= 1400, what="the reply at the caller")
    heard = bytes(caller.audio)
    blocks = [heard[i:i + 960] for i in range(0, len(heard), 960)]
    voiced = b"".join(b for b in blocks if rms_dbfs(b) > -40)
    assert abs(dominant_frequency(voiced, RTP_RATE) - 600) < 2
    assert abs(rms_dbfs(voiced) - (-9.0)) < 2  # the stub sends 0.5 amplitude: -9 dBFS
    await caller.wait_event("output_audio_buffer.stopped")
    kinds = [e["type"] for e in caller.events]
    assert "response.output_audio.delta" not in kinds  # audio travels on RTP only
    assert kinds.index("output_audio_buffer.started") < kinds.index("output_audio_buffer.stopped")
    started = caller.events_of("output_audio_buffer.started")[0]
    assert started["response_id"] == caller.events_of("response.created")[0]["response"]["id"]


async def test_transcripts_arrive_on_oai_events(bridge, stub, new_caller):
    caller, session = await connected_call(bridge, stub, new_caller)
    await stub.respond(session, text="the quick brown fox")
    done = await caller.wait_event("response.output_audio_transcript.done")
    assert done["transcript"] == "the quick brown fox"
    deltas = "".join(e["delta"] for e in caller.events_of("response.output_audio_transcript.delta"))
    assert deltas.split() == ["the", "quick", "brown", "fox"]


async def test_barge_in_truncates_at_exactly_the_audio_the_caller_received(bridge, stub, new_caller):
    caller, session = await connected_call(bridge, stub, new_caller)
    reply = await stub.respond(session, freq=500, ms=5000)  # 5 s arrive at once, faster than real time
    await eventually(lambda: tone_ms(bytes(caller.audio)) >= 1000, what="a second of the reply")
    await stub.speech_started(session)
    cleared = await caller.wait_event("output_audio_buffer.cleared")
    await eventually(lambda: session.truncations, what="the truncate upstream")
    (truncate,) = session.truncations
    assert truncate["item_id"] == reply["item_id"] and truncate["content_index"] == 0
    assert cleared["response_id"] == reply["response_id"]
    await asyncio.sleep(0.6)  # let whatever was handed to the encoder reach the caller
    # Counted at -25 dBFS (the tone is at -9): the speech-mode encoder's decay after a cut
    # rings out for ≈20 ms at -28..-33 dBFS, which is codec tail, not played audio.
    heard_ms = tone_ms(bytes(caller.audio), threshold_dbfs=-25)
    # Playback stops within a frame; what the caller heard matches audio_end_ms.
    # measured: the caller hears audio_end_ms + 10 ms (one 10 ms analysis block)
    assert abs(heard_ms - truncate["audio_end_ms"]) <= 20, (heard_ms, truncate["audio_end_ms"])
    assert 1000 <= truncate["audio_end_ms"] < 2500
    assert not [e for e in caller.events if e["type"] == "error"]  # the stub accepted the truncation


async def test_output_audio_buffer_clear_from_the_page_stops_playback_and_truncates(bridge, stub, new_caller):
    caller, session = await connected_call(bridge, stub, new_caller)
    await stub.respond(session, freq=500, ms=4000)
    await eventually(lambda: tone_ms(bytes(caller.audio)) >= 500, what="half a second of the reply")
    caller.send_event({"type": "output_audio_buffer.clear"})
    await caller.wait_event("output_audio_buffer.cleared")
    await eventually(lambda: session.truncations, what="the truncate upstream")
    assert not session.events_of("output_audio_buffer.clear")  # handled by the bridge, like OpenAI's endpoint
    await asyncio.sleep(0.5)
    assert tone_ms(bytes(caller.audio)) < 1500


async def test_page_events_pass_the_policy_or_get_an_error_event(bridge, stub, new_caller):
    caller, session = await connected_call(bridge, stub, new_caller)
    caller.send_event({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                       "content": [{"type": "input_text", "text": "hi"}]}})
    await caller.next_event("conversation.item.done")
    caller.send_event({"type": "input_audio_buffer.append", "audio": "AAAA"})
    err = await caller.next_event("error")
    assert err["error"]["code"] == "event_not_allowed"
    caller.send_event("{not json")
    assert (await caller.next_event("error"))["error"]["code"] == "invalid_json"
    caller.send_event({"type": "session.update", "session": {"instructions": "be brief", "model": "other"}})
    err = await caller.next_event("error")
    assert err["error"]["code"] == "session_fields_not_allowed" and "model" in err["error"]["message"]
    await eventually(lambda: len(session.events_of("session.update")) == 2, what="the filtered session.update")
    assert session.events_of("session.update")[1]["session"] == {"instructions": "be brief"}
    assert not session.events_of("input_audio_buffer.append")  # page audio only goes by RTP


async def test_an_upstream_closed_for_good_ends_the_call_and_the_page_is_told_why(bridge, stub, new_caller):
    # (1001/1006/1011/1012/1013 are handed off to a new session: test_handoff.py)
    caller, session = await connected_call(bridge, stub, new_caller)
    await stub.drop(4003, "model crashed")
    err = await caller.next_event("error")
    assert err["error"]["code"] == "upstream_closed"
    assert "4003" in err["error"]["message"] and "model crashed" in err["error"]["message"]
    await bridge.wait_no_calls()
    await eventually(lambda: caller.pc.connectionState == "closed", what="the peer to close")


async def test_an_upstream_that_refuses_gets_a_502_that_holds_no_secret(stub, start_bridge, new_caller):
    stub.refuse_status = 401
    bridge = await start_bridge(stub.url, api_key="sk-very-secret")
    caller = new_caller(bridge.url)
    with pytest.raises(RuntimeError) as exc:
        await caller.connect()
    status, body = str(exc.value).split(" ", 3)[2:4]
    error = json.loads(body)["error"]
    assert status == "502" and error["code"] == "upstream_unavailable"
    assert "HTTP 401" in error["message"] and "sk-very-secret" not in body
    assert bridge.registry.calls == {}


async def test_an_unreachable_upstream_gets_a_502_naming_the_host(start_bridge, new_caller):
    bridge = await start_bridge("ws://127.0.0.1:9/v1/realtime")  # nothing listens on port 9
    caller = new_caller(bridge.url)
    with pytest.raises(RuntimeError, match="502.*could not reach upstream ws://127.0.0.1:9/v1/realtime"):
        await caller.connect()
    assert bridge.registry.calls == {}


async def test_the_api_key_goes_only_in_the_upstream_header(stub, start_bridge, new_caller):
    bridge = await start_bridge(stub.url, api_key="sk-very-secret")
    caller, session = await connected_call(bridge, stub, new_caller)
    assert session.headers.get("authorization") == "Bearer sk-very-secret"
    assert "sk-very-secret" not in json.dumps(caller.events)


async def test_hangup_frees_every_resource_of_the_call(bridge, stub, new_caller):
    caller, session = await connected_call(bridge, stub, new_caller, freq=300)
    call = bridge.registry.calls[caller.call_id]
    tasks = set(call._tasks)
    assert await caller.hangup() == 200
    await bridge.wait_no_calls()
    assert call.pc.connectionState == "closed"
    assert all(t.done() for t in tasks)
    assert call.playback.readyState == "ended"
    await eventually(lambda: session.ws.state.name == "CLOSED", what="the upstream socket to close")
    await eventually(lambda: caller.pc.connectionState == "closed", what="the caller to see the close")


async def test_a_caller_whose_audio_stops_is_ended_after_the_media_timeout_and_told_why(stub, start_bridge, new_caller):
    from harness.caller import SourceTrack

    class Freezes(SourceTrack):
        """Sends half a second of audio, then nothing (a page that vanished without a goodbye)."""

        async def recv(self):
            if self._n >= 25:
                await asyncio.Event().wait()
            return await super().recv()

    bridge = await start_bridge(stub.url, media_timeout="1.5", reconnect_grace="0")
    caller = new_caller(bridge.url)
    caller.source = Freezes()
    await caller.connect()
    err = await caller.wait_event("error", timeout=10)
    assert err["error"]["code"] == "call_ended" and "no audio from the caller for 1.5 s" in err["error"]["message"]
    await bridge.wait_no_calls()


async def test_an_offer_that_never_connects_frees_its_slot_after_the_connect_timeout(stub, start_bridge):
    import aiohttp
    from aiortc import RTCPeerConnection

    bridge = await start_bridge(stub.url, connect_timeout="1")
    pc = RTCPeerConnection()
    pc.addTransceiver("audio")
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        async with http.post(bridge.url + "/v1/realtime/calls", data=pc.localDescription.sdp,
                             headers={"Content-Type": "application/sdp"}) as r:
            assert r.status == 201
    await pc.close()  # the answer is never applied: ICE never completes
    assert len(bridge.registry.calls) == 1
    await bridge.wait_no_calls(timeout=5)


async def test_a_call_ends_at_the_maximum_duration(stub, start_bridge, new_caller):
    bridge = await start_bridge(stub.url, max_call_seconds="1.5")
    caller = new_caller(bridge.url)
    await caller.connect()
    err = await caller.wait_event("error", timeout=10)
    assert "maximum duration of 1.5 s" in err["error"]["message"]
    await bridge.wait_no_calls()


async def test_under_packet_loss_every_hole_is_concealed_never_silence_and_the_timeline_holds(bridge, stub, new_caller):
    """10 % loss on the caller's RTP (the reusable impairment layer). An aiortc caller sends
    neither RED nor FEC, so every hole is rebuilt by libopus concealment: upstream gets the
    caller's full timeline, in order, with no frame of zeros and nothing stuck behind a hole."""
    from bench.impair import Impairment

    caller, session = await connected_call(bridge, stub, new_caller, freq=1000)
    call = bridge.registry.calls[caller.call_id]
    assert call.receive_buffer is not None  # the default receive buffer is ours
    impairment = Impairment(loss=0.10, seed=3)
    impairment.attach(caller.pc)
    start_bytes = len(session.audio)
    await asyncio.sleep(4.0)
    got_s = (len(session.audio) - start_bytes) / 2 / REALTIME_RATE
    dropped = impairment.up.rtp_dropped
    assert dropped >= 10
    stats = call.uplink.stats
    assert stats.concealed >= dropped - 2  # the last holes may still be waiting
    assert stats.red_recovered == stats.fec_recovered == 0 and stats.unfilled == 0
    assert abs(got_s - 4.0) < 0.15, got_s  # the timeline holds: holes were filled, not skipped
    assert call.receive_buffer.stats.lost == stats.lost
    audio = bytes(session.audio[start_bytes:])
    frames = [audio[i:i + FRAME_BYTES] for i in range(0, len(audio) - FRAME_BYTES + 1, FRAME_BYTES)]
    assert frames and not [f for f in frames if not any(f)]  # no 20 ms of zeros reached the model
    assert min(dominant_frequency(f) for f in frames[10:]) > 900  # concealment continues the tone


async def test_aiortc_s_own_audio_path_can_be_chosen(stub, start_bridge, new_caller):
    bridge = await start_bridge(stub.url, audio_path="aiortc")
    caller, session = await connected_call(bridge, stub, new_caller, freq=1000)
    call = bridge.registry.calls[caller.call_id]
    assert call.receive_buffer is None and call.uplink is None and call.packer is None
    await eventually(lambda: len(session.audio) > REALTIME_RATE, what="audio upstream")
