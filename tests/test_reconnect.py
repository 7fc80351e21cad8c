"""Calls that survive the caller's network going away: held, re-attached with a new peer
(real aiortc callers, real sockets), or ended when the grace runs out."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.conftest import connected_call, eventually


async def _held(bridge, call, timeout: float = 6.0) -> None:
    await eventually(lambda: call.held_since is not None, timeout, "the call held")


async def test_a_caller_whose_network_drops_re_attaches_and_the_conversation_goes_on(stub, start_bridge, new_caller):
    stub.reply_ms = 4000
    stub.realtime_pacing = True  # the reply streams in real time: it is mid-way when the network drops
    bridge = await start_bridge(stub.url, reconnect_grace="20")
    caller, session = await connected_call(bridge, stub, new_caller, freq=300)
    call = bridge.registry.calls[caller.call_id]
    info = await caller.wait_event("call.reconnect_info")
    assert info["secret"] == caller.reconnect_secret and info["url"].endswith(f"/{caller.call_id}/reconnect")
    caller.send_event({"type": "response.create"})
    await eventually(lambda: len(caller.audio) > 48000 * 2, 10, "a second of the reply heard")
    caller.drop_network()
    await _held(bridge, call)
    # what was playing was cut at what was played, and the response cancelled
    await eventually(lambda: session.truncations, 5, "a truncate upstream")
    item = session.truncations[-1]["item_id"]
    assert session.truncations[-1]["audio_end_ms"] <= session.item_audio_ms[item]
    assert session.events_of("response.cancel")
    assert len(bridge.registry.calls) == 1 and call.reason is None  # held, not ended
    heard_before = len(session.audio)

    # a new peer, with the secret: same call, same upstream session
    again = new_caller(bridge.url)
    again.source.freq = 500
    await again.reattach(caller.call_id, caller.reconnect_secret)
    assert again.call_id == caller.call_id and again.reconnect_secret != caller.reconnect_secret
    await asyncio.wait_for(again.channel_open.wait(), 10)
    fresh = await again.wait_event("call.reconnect_info")
    assert fresh["secret"] == again.reconnect_secret
    assert len(stub.sessions) == 1  # the upstream was never dropped
    await eventually(lambda: len(session.audio) > heard_before + 24000 * 2, 10, "the new peer's audio upstream")
    await eventually(lambda: call.held_since is None, 5, "resumed")
    again.send_event({"type": "response.create"})
    await eventually(lambda: len(again.audio) > 48000, 10, "the model heard on the new peer")

    # the old secret is stale now: 403, nothing changes
    stale = new_caller(bridge.url)
    try:
        await stale.reattach(caller.call_id, caller.reconnect_secret)
        raise AssertionError("a stale secret was accepted")
    except RuntimeError as exc:
        assert "403" in str(exc) and "invalid_reconnect_secret" in str(exc)
    assert call.reattaches == 1 and call.held_since is None

    # and a second re-attach works too
    again.drop_network()
    await _held(bridge, call)
    third = new_caller(bridge.url)
    third.source.freq = 700
    await third.reattach(caller.call_id, again.reconnect_secret)
    await asyncio.wait_for(third.channel_open.wait(), 10)
    third.send_event({"type": "response.create"})
    await eventually(lambda: len(third.audio) > 48000, 10, "the model heard after the second re-attach")
    assert call.reattaches == 2 and len(stub.sessions) == 1
    status = await third.hangup()
    assert status == 200
    await bridge.wait_no_calls()


async def test_a_caller_that_does_not_come_back_is_ended_after_the_grace_with_the_reason(stub, start_bridge, new_caller):
    bridge = await start_bridge(stub.url, reconnect_grace="1")
    caller, session = await connected_call(bridge, stub, new_caller, freq=300)
    call = bridge.registry.calls[caller.call_id]
    caller.drop_network()
    await _held(bridge, call)
    await asyncio.wait_for(call.wait_closed(), 10)
    assert "did not re-attach within 1 s" in call.reason
    await bridge.wait_no_calls()
    await eventually(lambda: session.ws.state.name == "CLOSED", 5, "the upstream closed")
    async with aiohttp.ClientSession() as http:  # and the call's routes are gone
        async with http.post(f"{bridge.url}/v1/realtime/calls/{caller.call_id}/reconnect",
                             headers={"Authorization": f"Bearer {caller.reconnect_secret}",
                                      "Content-Type": "application/sdp"}, data="v=0\r\n") as r:
            assert r.status == 404


async def test_reconnect_without_or_with_a_wrong_secret_is_403_and_changes_nothing(bridge, stub, new_caller):
    caller, _ = await connected_call(bridge, stub, new_caller)
    call = bridge.registry.calls[caller.call_id]
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer " + "x" * 32},
                        {"Authorization": "Bearer " + caller.call_id}):  # the id is not the secret
            async with http.post(f"{bridge.url}/v1/realtime/calls/{caller.call_id}/reconnect",
                                 headers={**headers, "Content-Type": "application/sdp"}, data="v=0\r\n") as r:
                assert r.status == 403
                assert (await r.json())["error"]["code"] == "invalid_reconnect_secret"
    assert call.reattaches == 0 and call.held_since is None and call.reason is None
    caller.send_event({"type": "response.create"})
    await caller.wait_event("response.done", 10)  # the call is untouched


async def test_on_aiortc_s_own_audio_path_a_silent_caller_is_held_and_re_attaches(stub, start_bridge, new_caller):
    bridge = await start_bridge(stub.url, reconnect_grace="20", audio_path="aiortc")
    caller, session = await connected_call(bridge, stub, new_caller, freq=300)
    call = bridge.registry.calls[caller.call_id]
    assert call.uplink is None and call.mic is not None  # aiortc decodes
    await eventually(lambda: len(session.audio) > 24000, 10, "the caller's audio upstream")
    caller.drop_network()
    await _held(bridge, call)
    assert call.reason is None
    heard_before = len(session.audio)
    again = new_caller(bridge.url)
    again.source.freq = 500
    await again.reattach(caller.call_id, caller.reconnect_secret)
    await asyncio.wait_for(again.channel_open.wait(), 10)
    await eventually(lambda: len(session.audio) > heard_before + 24000, 10, "the new peer's audio upstream")
    await eventually(lambda: call.held_since is None, 5, "resumed")
    assert len(stub.sessions) == 1 and call.reattaches == 1
    assert await again.hangup() == 200
