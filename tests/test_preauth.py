"""What a client can hold before it has done anything useful, and the limits on offers:
connection cap, header/body deadlines, per-address rate and pending limits, upstream
sessions of offers that never connect, SIGTERM with an offer in flight, crafted ids,
data-channel sizes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from websockets.asyncio.server import serve
from websockets.protocol import State

from tests.conftest import connected_call, eventually

ROOT = Path(__file__).resolve().parent.parent


async def _raw(url: str, data: bytes, *, read: bool = True, timeout: float = 5.0) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), timeout) if read else b""
    finally:
        writer.close()


async def test_silent_connections_past_the_cap_make_room_and_a_real_request_still_gets_through(stub, start_bridge):
    from signaling.routes import GUARD

    bridge = await start_bridge(stub.url, max_connections="16")
    guard = bridge.app[GUARD]
    assert guard.max_connections == 16
    host, port = bridge.url.removeprefix("http://").split(":")
    silent = []
    for _ in range(60):
        _, w = await asyncio.open_connection(host, int(port))
        silent.append(w)
    await eventually(lambda: guard.evicted >= 44, 5, "idle connections evicted")
    assert guard.open <= 16
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        async with http.get(bridge.url + "/healthz") as r:
            assert r.status == 200
    assert time.monotonic() - started < 1.0
    async with aiohttp.ClientSession() as http:
        async with http.get(bridge.url + "/metrics.json") as r:
            stats = (await r.json())["http_connections"]
    assert stats["cap"] == 16 and stats["evicted"] >= 44 and stats["open"] <= 16
    for w in silent:
        w.close()


async def test_a_body_that_trickles_gets_408_in_the_error_shape(bridge, monkeypatch):
    import signaling.routes

    monkeypatch.setattr(signaling.routes, "BODY_TIMEOUT_S", 0.5)
    started = time.monotonic()
    reply = await _raw(bridge.url, b"POST /v1/realtime/calls HTTP/1.1\r\nHost: x\r\nContent-Type: application/sdp\r\n"
                                   b"Content-Length: 1000\r\n\r\nv=0\r\n")
    assert reply.startswith(b"HTTP/1.1 408")
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_timeout"
    assert time.monotonic() - started < 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _start_server(port: int, upstream: str, *code: str, **env: str) -> subprocess.Popen:
    script = "; ".join(("import server", *code, "server.main()"))
    proc = subprocess.Popen([sys.executable, "-c", script, "--port", str(port), "--env-file", "/nonexistent"],
                            cwd=ROOT, env={**os.environ, "REALTIME_URL": upstream, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                    if r.status == 200:
                        return proc
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError("server did not start")


async def test_headers_sent_a_byte_at_a_time_are_cut_off_at_the_idle_deadline():
    port = _free_port()
    proc = await _start_server(port, "ws://127.0.0.1:9/v1/realtime", "server.IDLE_TIMEOUT_S = 1.0")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        closed_after = None
        for byte in b"POST /v1/realtime/calls HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                closed_after = time.monotonic() - started
                break
            try:
                if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except asyncio.TimeoutError:
                pass
        writer.close()
        assert closed_after is not None and closed_after < 3, closed_after  # trickling does not keep it open
    finally:
        proc.terminate()
        proc.wait(10)


async def test_offers_from_one_address_are_rate_limited_with_429_and_retry_after(stub, start_bridge, new_caller):
    bridge = await start_bridge(stub.url, offers_per_minute="3")
    for _ in range(3):
        await new_caller(bridge.url).connect()
    with pytest.raises(RuntimeError, match="offer refused: 429") as refused:
        await new_caller(bridge.url).connect()
    error = json.loads(str(refused.value).split(" ", 3)[3])["error"]
    assert error["code"] == "rate_limited" and error["type"] == "rate_limit_error"
    assert "3 offers a minute" in error["message"]
    assert len(bridge.registry.calls) == 3
    # the operator's own token is exempt: a backend relays offers for many users
    bridge2 = await start_bridge(stub.url, offers_per_minute="1", auth_token="operator-token")
    for _ in range(3):
        await new_caller(bridge2.url).connect(headers={"Authorization": "Bearer operator-token"})


async def test_retry_after_on_a_rate_limited_offer_is_when_one_is_allowed_again(stub, start_bridge):
    bridge = await start_bridge(stub.url, offers_per_minute="60")
    limits = bridge.registry.limits
    for _ in range(60):
        assert limits.check("198.51.100.7") is None
    reason, retry = limits.check("198.51.100.7")
    assert retry == 1 and "60 offers a minute" in reason
    assert limits.check("198.51.100.8") is None  # other addresses are not affected


async def test_offers_that_have_not_connected_are_limited_per_address(stub, start_bridge, new_caller):
    bridge = await start_bridge(stub.url, pending_offers_per_address="2", offers_per_minute="0")
    slow = [new_caller(bridge.url), new_caller(bridge.url)]
    tasks = [asyncio.create_task(c.connect(answer_delay=2.0)) for c in slow]
    await eventually(lambda: len(bridge.registry.calls) == 2, 5, "two offers answered")
    with pytest.raises(RuntimeError, match="offer refused: 429") as refused:
        await new_caller(bridge.url).connect()
    assert "2 calls from your address have not connected yet" in str(refused.value)
    await asyncio.gather(*tasks)
    await eventually(lambda: all(c.connected_at for c in bridge.registry.calls.values()), 10, "both connected")
    await new_caller(bridge.url).connect()  # connected calls no longer count as pending
    assert len(bridge.registry.calls) == 3


async def test_an_offer_that_does_not_connect_gives_its_upstream_session_back_and_a_late_peer_gets_a_new_one(
        bridge, stub, new_caller, monkeypatch):
    import realtime.call

    monkeypatch.setattr(realtime.call, "UPSTREAM_HOLD_S", 0.5)
    caller = new_caller(bridge.url)
    caller.source.freq = 440
    connecting = asyncio.create_task(caller.connect(answer_delay=1.5))
    first = await stub.wait_session()
    await eventually(lambda: first.ws.state is State.CLOSED, 3, "the first upstream session closed")
    assert len(bridge.registry.calls) == 1 and len(stub.sessions) == 1  # the call waits, holding no session
    await connecting
    await eventually(lambda: len(stub.sessions) == 2, 10, "a new upstream session once connected")
    second = stub.sessions[1]
    assert second.events_of("session.update"), "the new session was configured"
    await asyncio.wait_for(caller.channel_open.wait(), 10)
    await caller.wait_event("session.updated")
    await eventually(lambda: len(second.audio) > 24000, 10, "the caller's audio reaches the new session")
    assert len(caller.events_of("session.created")) == 1  # the page saw one session, not two


async def test_an_offer_that_never_connects_holds_its_upstream_only_briefly(bridge, stub, new_caller, monkeypatch):
    import realtime.call

    monkeypatch.setattr(realtime.call, "UPSTREAM_HOLD_S", 0.5)
    caller = new_caller(bridge.url)
    caller.pc.addTrack(caller.source)
    caller.pc.createDataChannel("oai-events")
    await caller.pc.setLocalDescription(await caller.pc.createOffer())
    async with aiohttp.ClientSession() as http:
        async with http.post(bridge.url + "/v1/realtime/calls", data=caller.pc.localDescription.sdp,
                             headers={"Content-Type": "application/sdp"}) as r:
            assert r.status == 201
    await caller.pc.close()  # the answer is never used
    session = await stub.wait_session()
    started = time.monotonic()
    await eventually(lambda: session.ws.state is State.CLOSED, 3, "the upstream session closed")
    assert time.monotonic() - started < 2


async def test_sigterm_with_an_offer_in_flight_answers_503_not_a_dead_call(new_caller):
    accepted = asyncio.Event()

    async def slow_handshake(connection, request):
        accepted.set()
        await asyncio.sleep(2.0)  # the upstream takes its time: the offer is still being answered
        return None

    async def handler(ws):
        await ws.send(json.dumps({"type": "session.created", "session": {}}))
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, process_request=slow_handshake) as upstream:
        up_port = upstream.sockets[0].getsockname()[1]
        port = _free_port()
        proc = await _start_server(port, f"ws://127.0.0.1:{up_port}/v1/realtime")
        try:
            caller = new_caller(f"http://127.0.0.1:{port}")
            offer = asyncio.create_task(caller.connect())
            await asyncio.wait_for(accepted.wait(), 10)
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(RuntimeError, match="offer refused: 503") as refused:
                await offer
            assert "server_shutting_down" in str(refused.value)
            assert proc.wait(15) == 0
            assert "Traceback" not in proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()


async def test_crafted_call_ids_are_never_forwarded_anywhere(bridge):
    from signaling.routes import CALL_ID, Workers

    workers = Workers(0, 2, (1, 2))
    good = "rtc_" + "0123456789abcdef012345"
    assert CALL_ID.fullmatch(good + "w1") and workers.owner(good + "w1") == 1
    for crafted in (good + "/../../healthz?w1", "rtc_x?w1", "..%2fmetricsw1", good + "#w1", "w1", good + "w99"):
        assert workers.owner(crafted) is None
    async with aiohttp.ClientSession() as http:
        async with http.post(bridge.url + "/v1/realtime/calls/rtc_x%3Fa%3Dw1/hangup") as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "call_not_found"


async def test_a_data_channel_message_over_the_advertised_limit_is_dropped_with_an_error(bridge, stub, new_caller):
    caller, _ = await connected_call(bridge, stub, new_caller)
    caller.pc.sctp._remote_max_message_size = 0  # a peer that ignores the answer's max-message-size
    caller.send_event("x" * 300_000)
    error = await caller.next_event("error", 10)
    assert error["error"]["code"] == "message_too_large" and "300000 bytes was dropped" in error["error"]["message"]
    caller.send_event({"type": "response.create"})  # the call goes on
    await caller.wait_event("response.created", 10)


async def test_a_peer_that_floods_unfinished_fragments_is_ended_with_the_reason(bridge, stub, new_caller):
    from aiortc.rtcsctptransport import DataChunk

    caller, _ = await connected_call(bridge, stub, new_caller)
    call = next(iter(bridge.registry.calls.values()))
    transport = call.pc.sctp
    tsn = transport._last_received_tsn
    for i in range(1000):  # first fragments of a message that never ends: 1.2 MB held
        tsn = (tsn + 1) % (1 << 32)
        chunk = DataChunk(flags=0x02 if i == 0 else 0x00)  # FIRST_FRAG only, then middles
        chunk.tsn, chunk.stream_id, chunk.stream_seq, chunk.protocol = tsn, 1, 0, 51
        chunk.user_data = b"y" * 1200
        await transport._receive_data_chunk(chunk)
        if call.reason:
            break
    await call.wait_closed()
    assert "receive window" in call.reason
    held = sum(len(c.user_data) for s in transport._inbound_streams.values() for c in s.reassembly)
    assert held == 0



async def test_a_text_message_that_is_not_utf8_gets_an_error_and_the_call_goes_on(bridge, stub, new_caller):
    caller, _ = await connected_call(bridge, stub, new_caller)
    call = next(iter(bridge.registry.calls.values()))
    error = asyncio.ensure_future(caller.next_event("error", 10))
    bad = b'{"type":"response.create","x":"' + b"\xff" + b'"}'  # raw SCTP, "WebRTC String" (51), as a hostile page sends it
    await caller.pc.sctp._send(caller.channel.id, 51, bad)
    error = await error
    assert error["error"]["code"] == "invalid_utf8"
    assert "0xff at offset 31" in error["error"]["message"]
    assert call.reason is None and caller.pc.connectionState == "connected"
    caller.send_event({"type": "response.create"})  # the call goes on
    await caller.wait_event("response.created", 10)


async def test_a_channel_open_with_a_label_that_is_not_utf8_or_for_an_open_stream_is_dropped(bridge, stub, new_caller, caplog):
    import struct

    caller, _ = await connected_call(bridge, stub, new_caller)
    call = next(iter(bridge.registry.calls.values()))
    label = b"oai-\xfe\xff"
    await caller.pc.sctp._send(7, 50, struct.pack("!BBHLHH", 0x03, 0, 0, 0, len(label), 0) + label)
    again = struct.pack("!BBHLHH", 0x03, 0, 0, 0, 10, 0) + b"oai-events"  # a second open of the open channel
    await caller.pc.sctp._send(caller.channel.id, 50, again)
    caller.send_event({"type": "response.create"})  # ordered after both on the wire: the call went on
    await caller.wait_event("response.created", 10)
    assert call.reason is None and 7 not in call.pc.sctp._data_channels
    dropped = [r.getMessage() for r in caplog.records if "open request was dropped" in r.getMessage()]
    assert any("not UTF-8" in m for m in dropped) and any("already open" in m for m in dropped)
