"""Server-side control, end to end: the official `openai` SDK as the operator's sideband,
server-run tools against a real tool service, and the call records they leave.
Real aiortc callers, a real Realtime stub over WebSocket, real HTTP."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest
from aiohttp import web
from openai import AsyncOpenAI

from control.plane import PLANE
from harness.stub import RealtimeStub
from harness.web import serve_app, tools_toml
from media.audio import dominant_frequency
from tests.conftest import eventually

TOKEN = "operator-token-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TOOL_SECRET = "tool-service-secret-9f8e7d6c5b4a"


async def _call(bridge, stub, new_caller, *, freq=None):
    caller = new_caller(bridge.url)
    caller.source.freq = freq
    await caller.connect(headers=AUTH)
    session = await stub.wait_session()
    await asyncio.wait_for(caller.channel_open.wait(), 10)
    await caller.wait_event("session.updated")
    return caller, session


async def _record(bridge, call_id: str, until=lambda r: True, timeout: float = 5.0) -> dict:
    """The call's record, once `until(record)` holds (a record's writes are tasks of their own)."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{bridge.url}/v1/realtime/calls/{call_id}", headers=AUTH) as r:
                record = await r.json()
            if r.status == 200 and until(record):
                return record
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"the record never got there: {record}")
            await asyncio.sleep(0.05)


def _sdk(bridge) -> AsyncOpenAI:
    return AsyncOpenAI(api_key=TOKEN, base_url=bridge.url + "/v1")


async def test_the_official_sdk_watches_and_steers_a_live_call_and_is_told_when_it_ends(stub, start_bridge, new_caller):
    bridge = await start_bridge(stub.url, auth_token=TOKEN)
    caller, session = await _call(bridge, stub, new_caller)
    seen: list = []
    async with _sdk(bridge).realtime.connect(call_id=caller.call_id) as conn:
        first = await asyncio.wait_for(conn.recv(), 5)
        assert first.type == "session.created" and first.session.type == "realtime"
        # what the model says reaches the sideband as it reaches the page
        await stub.respond(text="sideband sees this")
        while True:
            event = await asyncio.wait_for(conn.recv(), 5)
            seen.append(event.type)
            if event.type == "response.done":
                break
        assert "response.output_audio_transcript.done" in seen
        assert "response.output_audio.delta" not in seen  # audio only if asked for
        # the sideband's response.create makes the model speak to the caller
        before = len(caller.audio)
        await conn.response.create()
        await eventually(lambda: len(session.events_of("response.create")) == 1, 5, "response.create upstream")
        await eventually(lambda: len(caller.audio) - before > 48000, 10, "the model's reply at the caller")
        reply = __import__("numpy").frombuffer(bytes(caller.audio[before + 9600:]), dtype="<i2")
        assert abs(dominant_frequency(reply, 48000) - stub.reply_freq) < 15
        # a refused event is answered on the sideband only
        await conn.send({"type": "input_audio_buffer.append", "audio": "AAAA"})
        while (event := await asyncio.wait_for(conn.recv(), 5)).type != "error":
            pass
        assert event.error.code == "event_not_allowed"
        assert not [e for e in caller.events_of("error") if e["error"].get("code") == "event_not_allowed"]
        # the caller hangs up: the sideband gets call.ended with the reason, then a close
        assert await caller.hangup() == 200
        ended = None
        try:
            while True:
                event = await asyncio.wait_for(conn.recv(), 5)
                if event.type == "call.ended":
                    ended = event
        except Exception as exc:  # the close that follows
            assert "1000" in str(exc) or type(exc).__name__ in ("ConnectionClosedOK", "OpenAIError"), exc
    assert ended is not None and ended.reason == "hung up by the client" and ended.end_category == "hangup"
    await bridge.wait_no_calls()


async def test_the_sideband_needs_the_operator_credential(stub, start_bridge, new_caller):
    bridge = await start_bridge(stub.url, auth_token=TOKEN)
    caller, _ = await _call(bridge, stub, new_caller)
    async with aiohttp.ClientSession() as http:
        for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 401)):
            async with http.get(f"{bridge.url}/v1/realtime?call_id={caller.call_id}", headers=headers) as r:
                assert r.status == status
                assert (await r.json())["error"]["code"] == "invalid_api_key"
        async with http.get(f"{bridge.url}/v1/realtime?call_id=rtc_0123456789abcdef012345", headers=AUTH) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "call_not_found"
        # an ephemeral key (a page's) is not the operator's
        async with http.post(f"{bridge.url}/v1/realtime/client_secrets", json={}, headers=AUTH) as r:
            key = (await r.json())["value"]
        async with http.get(f"{bridge.url}/v1/realtime?call_id={caller.call_id}",
                            headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 401


async def test_without_a_token_the_sideband_is_refused_unless_loopback_is_allowed(stub, start_bridge, new_caller):
    closed = await start_bridge(stub.url)
    caller = new_caller(closed.url)
    await caller.connect()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{closed.url}/v1/realtime?call_id={caller.call_id}") as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "operator_routes_disabled"
        async with http.get(f"{closed.url}/v1/realtime/calls/{caller.call_id}") as r:
            assert r.status == 403
    stub2 = await RealtimeStub().start()
    try:
        opened = await start_bridge(stub2.url, operator_on_loopback="true")
        caller2 = new_caller(opened.url)
        await caller2.connect()
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"{opened.url}/v1/realtime?call_id={caller2.call_id}&include_audio=true") as ws:
                first = await ws.receive_json(timeout=5)
                assert first["type"] == "session.created"
                await stub2.wait_session()
                await asyncio.wait_for(caller2.channel_open.wait(), 10)
                await stub2.respond(ms=200)
                kinds = []
                while "response.done" not in kinds:
                    kinds.append((await ws.receive_json(timeout=5))["type"])
                assert "response.output_audio.delta" in kinds  # asked for
    finally:
        await stub2.stop()


def _tool_service(received: list, *, fail_first: int = 0, delay: float = 0.0):
    app = web.Application()
    state = {"calls": 0}

    async def lookup(request: web.Request) -> web.Response:
        state["calls"] += 1
        received.append({"headers": dict(request.headers), "body": await request.json()})
        if state["calls"] <= fail_first:
            return web.Response(status=500, text="boom")
        await asyncio.sleep(delay)
        number = (await request.json()).get("number")
        return web.json_response({"order": number, "status": "shipped", "eta_days": 2})

    app.router.add_post("/lookup", lookup)
    return app


def _tools_file(tmp_path, url: str, timeout: float = 5) -> str:
    path = tmp_path / "tools.toml"
    path.write_text(tools_toml(url, timeout=timeout))
    return str(path)


async def test_a_server_tool_is_called_with_its_secret_and_the_model_gets_the_result(
        stub, start_bridge, new_caller, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("ORDERS_TOKEN", TOOL_SECRET)
    received: list = []
    runner, url = await serve_app(_tool_service(received))
    try:
        bridge = await start_bridge(stub.url, auth_token=TOKEN, tools_config=_tools_file(tmp_path, url))
        caller, session = await _call(bridge, stub, new_caller)
        # the session the model got declares the tool (no URL, no headers)
        tools = session.session.get("tools")
        assert [t["name"] for t in tools] == ["lookup_order"] and "url" not in tools[0]
        # a page that sets its own tools keeps the server's
        caller.send_event({"type": "session.update", "session": {"type": "realtime", "tools": [
            {"type": "function", "name": "page_tool", "description": "the page's", "parameters": {"type": "object"}}]}})
        await eventually(lambda: {t["name"] for t in session.session["tools"]} == {"page_tool", "lookup_order"}, 5,
                         "both tools declared")
        call = await stub.call_function("lookup_order", json.dumps({"number": "A-1001"}))
        await eventually(lambda: session.events_of("response.create"), 10, "the bridge's response.create")
        outputs = [e["item"] for e in session.events_of("conversation.item.create")
                   if e["item"].get("type") == "function_call_output"]
        assert len(outputs) == 1 and outputs[0]["call_id"] == call["call_id"]
        assert json.loads(outputs[0]["output"]) == {"order": "A-1001", "status": "shipped", "eta_days": 2}
        assert received[0]["body"] == {"number": "A-1001"}
        assert received[0]["headers"]["Authorization"] == f"Bearer {TOOL_SECRET}"
        assert received[0]["headers"]["X-Tool-Call-Id"] == call["call_id"]
        # the page saw the call and its output as ordinary events, never the secret or the endpoint
        await eventually(lambda: any(e.get("item", {}).get("type") == "function_call_output"
                                     for e in caller.events_of("conversation.item.added")), 5, "output at the page")
        page_text = json.dumps(caller.events)
        assert TOOL_SECRET not in page_text and url not in page_text
        # a page tool is left to the page
        await stub.call_function("page_tool", "{}")
        await asyncio.sleep(0.5)
        assert len(session.events_of("response.create")) == 1
        # the record has the tool call with its duration and the usage
        record = await _record(bridge, caller.call_id, lambda r: len(r["tool_calls"]) == 2)
        tool = next(t for t in record["tool_calls"] if t["name"] == "lookup_order")
        assert tool["runner"] == "bridge" and tool["status"] == "completed" and tool["duration_ms"] >= 0
        assert json.loads(tool["arguments"]) == {"number": "A-1001"}
        page_tool = next(t for t in record["tool_calls"] if t["name"] == "page_tool")
        assert page_tool["runner"] is None and page_tool["status"] == "pending"
        caller.send_event({"type": "conversation.item.create", "item": {
            "type": "function_call_output", "call_id": page_tool["call_id"], "output": "{}"}})
        record = await _record(bridge, caller.call_id, lambda r: r["tool_calls"][1]["status"] == "completed"
                               and r["usage"]["responses"] == 3)
        page_tool = next(t for t in record["tool_calls"] if t["name"] == "page_tool")
        assert page_tool["runner"] == "page" and page_tool["status"] == "completed"
        # two function-call responses (30 each) and the reply to the tool output (100)
        assert record["usage"]["total_tokens"] == 160 and record["usage"]["input_token_details"]["audio_tokens"] == 30
        await caller.hangup()
        assert TOOL_SECRET not in caplog.text and f"{url}/lookup" not in caplog.text
    finally:
        await runner.cleanup()


async def test_a_failing_or_slow_tool_becomes_an_output_saying_what_failed(stub, start_bridge, new_caller, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("ORDERS_TOKEN", TOOL_SECRET)
    received: list = []
    runner, url = await serve_app(_tool_service(received, fail_first=1, delay=1.0))
    try:
        bridge = await start_bridge(stub.url, tools_config=_tools_file(tmp_path, url, timeout=0.5), operator_on_loopback="true")
        caller = new_caller(bridge.url)
        await caller.connect()
        session = await stub.wait_session()
        await stub.call_function("lookup_order", '{"number": "1"}')  # HTTP 500
        await eventually(lambda: len(session.events_of("response.create")) == 1, 10, "first answer")
        await stub.call_function("lookup_order", '{"number": "2"}')  # slower than its timeout
        await eventually(lambda: len(session.events_of("response.create")) == 2, 10, "second answer")
        await stub.call_function("lookup_order", "{not json")
        await eventually(lambda: len(session.events_of("response.create")) == 3, 10, "third answer")
        # a response the caller cut short runs no tool (its arguments may be half written)
        cut = await stub.call_function("lookup_order", '{"numb', status="cancelled")
        record = await _record(bridge, caller.call_id, lambda r: any(
            t["call_id"] == cut["call_id"] and t["status"] != "pending" for t in r["tool_calls"]))
        assert next(t for t in record["tool_calls"] if t["call_id"] == cut["call_id"])["status"] == \
            "not_run_response_cancelled"
        outputs = [json.loads(e["item"]["output"])["error"] for e in session.events_of("conversation.item.create")
                   if e["item"].get("type") == "function_call_output"]
        assert "HTTP 500" in outputs[0]
        assert "did not answer within 0.5 s" in outputs[1]
        assert "not valid JSON" in outputs[2]
        assert len(received) == 2  # bad arguments never reach the service, nor a cancelled response's
        assert len(session.events_of("response.create")) == 3
        # and each outcome is counted for Prometheus, with its time
        from prometheus_client.parser import text_string_to_metric_families

        async with aiohttp.ClientSession() as http:
            async with http.get(bridge.url + "/metrics") as r:
                text = await r.text()
        counts = {s.labels["status"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                  if s.name == "bridge_tool_seconds_count"}
        assert counts == {"http_error": 1, "timeout": 1, "invalid_arguments": 1, "not_run_response_cancelled": 1}
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("body, message", [
    ("[[tool]]\nname = 'x y'\n", "'name' must be"),
    ("[[tool]]\nname = 'a'\ndescription = 'd'\nurl = 'ftp://x'\n", "'url' must be an http"),
    ("[[tool]]\nname = 'a'\ndescription = 'd'\nurl = 'http://x'\nparameters = { type = 'string' }\n", "type = \"object\""),
    ("[[tool]]\nname = 'a'\ndescription = 'd'\nurl = 'http://x'\nheaders = { A = '${NOPE_NOT_SET}' }\n", "NOPE_NOT_SET"),
    ("[[tool]]\nname = 'a'\ndescription = 'd'\nurl = 'http://x'\nsecret = 1\n", "unknown key 'secret'"),
    ("[[tool]]\nname = 'a'\ndescription = 'd'\nurl = 'http://x'\n[[tool]]\nname = 'a'\ndescription = 'd'\nurl = 'http://x'\n", "declared twice"),
    ("[tool\n", "not valid TOML"),
])
def test_a_bad_tools_file_stops_start_up_with_one_line(tmp_path, body, message):
    import settings as config

    path = tmp_path / "tools.toml"
    path.write_text(body)
    with pytest.raises(config.ConfigError) as err:
        config.from_raw({"tools_config": str(path)})
    assert message in str(err.value) and "\n" not in str(err.value) and "TOOLS_CONFIG" in str(err.value)


def test_a_yaml_tools_file_is_read_too(tmp_path):
    import settings as config

    path = tmp_path / "tools.yaml"
    path.write_text("tool:\n  - name: ping\n    description: Ping.\n    url: http://127.0.0.1:9/ping\n")
    s = config.from_raw({"tools_config": str(path)})
    assert s.session_config()["tools"][0]["name"] == "ping"


async def test_a_record_holds_transcripts_barge_ins_and_the_end_and_survives_a_restart(stub, start_bridge, new_caller,
                                                                                      tmp_path):
    db = str(tmp_path / "calls.db")
    bridge = await start_bridge(stub.url, auth_token=TOKEN, records_db=db)
    caller, session = await _call(bridge, stub, new_caller)
    await session.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": "item_user1",
                        "content_index": 0, "transcript": "where is my order"})
    reply = asyncio.ensure_future(stub.respond(ms=3000, text="it is on its way"))
    await caller.wait_event("output_audio_buffer.started")
    await asyncio.sleep(0.6)
    await stub.speech_started()  # the caller speaks over the model
    await eventually(lambda: session.events_of("conversation.item.truncate"), 5, "truncate")
    await reply
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{bridge.url}/v1/realtime/calls/{caller.call_id}", headers=AUTH) as r:
            live = await r.json()
        assert live["status"] == "active" and live["connected_at"] >= live["created_at"]
        assert await caller.hangup() == 200
        await bridge.wait_no_calls()
    record = await _record(bridge, caller.call_id, lambda r: r["status"] == "ended")
    assert record["status"] == "ended" and record["end_reason"] == "hung up by the client"
    assert record["end_category"] == "hangup" and record["ended_at"] >= record["connected_at"]
    said = [(t["role"], t["text"]) for t in record["transcript"]]
    assert said == [("user", "where is my order"), ("assistant", "it is on its way")]
    truncate = session.events_of("conversation.item.truncate")[0]
    assistant = record["transcript"][1]
    assert assistant["truncated"] and assistant["audio_end_ms"] == truncate["audio_end_ms"]
    assert record["barge_ins"][0]["cause"] == "speech"
    assert record["truncations"][0]["audio_end_ms"] == truncate["audio_end_ms"]
    assert record["usage"]["responses"] == 1 and record["usage"]["total_tokens"] == 100
    assert record["audio"]["uplink"]["packets"] > 0 and "lost" in record["audio"]["uplink"]
    assert record["audio"]["playback"]["audio_frames"] > 0 and "max_lateness_ms" in record["audio"]["playback"]
    # a new server on the same database still has it, and lists it
    stub2 = await RealtimeStub().start()
    try:
        again = await start_bridge(stub2.url, auth_token=TOKEN, records_db=db)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{again.url}/v1/realtime/calls/{caller.call_id}", headers=AUTH) as r:
                assert r.status == 200 and (await r.json())["transcript"] == record["transcript"]
            async with http.get(f"{again.url}/v1/realtime/calls?since={record['created_at'] - 1}", headers=AUTH) as r:
                listed = await r.json()
            assert [c["id"] for c in listed["data"]] == [caller.call_id] and listed["has_more"] is False
            async with http.get(f"{again.url}/v1/realtime/calls?since=oops", headers=AUTH) as r:
                assert r.status == 400
            from datetime import datetime, timezone

            iso = datetime.fromtimestamp(record["created_at"] - 1, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            async with http.get(f"{again.url}/v1/realtime/calls", params={"since": iso}, headers=AUTH) as r:
                assert [c["id"] for c in (await r.json())["data"]] == [caller.call_id]  # ISO 8601 too
            later = datetime.fromtimestamp(record["created_at"] + 5, timezone.utc).isoformat()
            async with http.get(f"{again.url}/v1/realtime/calls", params={"since": later}, headers=AUTH) as r:
                assert (await r.json())["data"] == []
            async with http.get(f"{again.url}/v1/realtime/calls/rtc_0123456789abcdef012345", headers=AUTH) as r:
                assert r.status == 404
    finally:
        await stub2.stop()


WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def _receiver(got: list, *, fail_first: int = 0):
    app = web.Application()

    async def hook(request: web.Request) -> web.Response:
        got.append((dict(request.headers), await request.text()))
        return web.Response(status=503 if len(got) <= fail_first else 204)

    app.router.add_post("/hook", hook)
    return app


async def test_a_webhook_is_signed_retried_after_failures_and_verified_by_the_reference(
        stub, start_bridge, new_caller, monkeypatch):
    from standardwebhooks import Webhook

    monkeypatch.setattr("control.webhooks.RETRY_DELAYS_S", (0.2, 0.4, 0.8))
    got: list = []
    runner, url = await serve_app(_receiver(got, fail_first=2))
    try:
        bridge = await start_bridge(stub.url, auth_token=TOKEN, webhook_url=f"{url}/hook", webhook_secret=WEBHOOK_SECRET)
        caller, _ = await _call(bridge, stub, new_caller)
        await stub.respond(ms=200, text="bye")
        assert await caller.hangup() == 200
        await eventually(lambda: len(got) == 3, 10, "three attempts")
        ids = {h["webhook-id"] for h, _ in got}
        assert len(ids) == 1  # the same message each time
        headers, body = got[-1]
        payload = Webhook(WEBHOOK_SECRET).verify(body, headers)
        assert payload["type"] == "realtime.call.ended" and payload["data"]["id"] == caller.call_id
        assert payload["data"]["end_reason"] == "hung up by the client"
        assert payload["data"]["transcript"][-1]["text"] == "bye"
        with pytest.raises(Exception):
            Webhook("whsec_" + "A" * 32).verify(body, headers)  # another key does not verify
        record = await _record(bridge, caller.call_id, lambda r: (r.get("webhooks") or [{}])[0].get("delivered_at"))
        status = record["webhooks"]
        assert status[0]["attempts"] == 3 and status[0]["delivered_at"] is not None
        from prometheus_client.parser import text_string_to_metric_families

        async with aiohttp.ClientSession() as http:
            async with http.get(bridge.url + "/metrics") as r:
                attempts = {s.labels["outcome"]: s.value for f in text_string_to_metric_families(await r.text())
                            for s in f.samples if s.name == "bridge_webhook_attempts_total"}
        assert attempts == {"delivered": 1, "failed": 2}
        assert TOKEN not in body and WEBHOOK_SECRET not in body
    finally:
        await runner.cleanup()


async def test_an_undelivered_webhook_is_sent_after_a_restart(stub, start_bridge, new_caller, tmp_path, monkeypatch):
    from standardwebhooks import Webhook

    monkeypatch.setattr("control.webhooks.RETRY_DELAYS_S", (0.2, 60.0))
    db = str(tmp_path / "outbox.db")
    down = await start_bridge(stub.url, records_db=db, webhook_url="http://127.0.0.1:9/hook",
                              webhook_secret=WEBHOOK_SECRET)
    caller = new_caller(down.url)
    await caller.connect()
    await stub.wait_session()
    call_id = caller.call_id
    assert await caller.hangup() == 200
    plane = down.app[PLANE]
    await eventually(lambda: plane.deliverer.failed_attempts >= 1, 10, "a failed attempt")
    store = plane.store
    assert (await store.webhook_status(call_id))[0]["delivered_at"] is None
    await down.app.shutdown()
    await down.app.cleanup()
    got: list = []
    runner, url = await serve_app(_receiver(got))
    try:
        stub2 = await RealtimeStub().start()
        await start_bridge(stub2.url, records_db=db, webhook_url=f"{url}/hook", webhook_secret=WEBHOOK_SECRET)
        await eventually(lambda: got, 10, "the delivery after the restart")
        payload = Webhook(WEBHOOK_SECRET).verify(got[0][1], got[0][0])
        assert payload["data"]["id"] == call_id
        await stub2.stop()
    finally:
        await runner.cleanup()


def test_a_webhook_secret_that_is_not_whsec_base64_is_refused_at_start():
    import settings as config

    with pytest.raises(config.ConfigError, match="WEBHOOK_SECRET"):
        config.from_raw({"webhook_url": "http://127.0.0.1/h", "webhook_secret": "whsec_not base64!"})
    with pytest.raises(config.ConfigError, match="needs WEBHOOK_SECRET"):
        config.from_raw({"webhook_url": "http://127.0.0.1/h"})


async def test_metrics_speak_prometheus_text_with_calls_by_end_reason_and_latency_histograms(stub, start_bridge,
                                                                                           new_caller):
    from prometheus_client.parser import text_string_to_metric_families

    bridge = await start_bridge(stub.url)
    caller, session = await _call(bridge, stub, new_caller, freq=440)
    await session.send({"type": "input_audio_buffer.speech_stopped", "item_id": "item_u", "audio_end_ms": 1000})
    await stub.respond(ms=400)
    await eventually(lambda: len(caller.audio) > 9600, 5, "reply audio")
    assert await caller.hangup() == 200
    await bridge.wait_no_calls()
    async with aiohttp.ClientSession() as http:
        async with http.get(bridge.url + "/metrics") as r:
            assert r.status == 200 and r.content_type == "text/plain"
            families = {f.name: f for f in text_string_to_metric_families(await r.text())}
        async with http.get(bridge.url + "/metrics.json") as r:
            assert (await r.json())["total_calls"] == 1  # the view for people stays
    samples = [s for f in families.values() for s in f.samples]
    value = lambda name, **labels: next(s.value for s in samples if s.name == name  # noqa: E731
                                        and all(s.labels.get(k) == v for k, v in labels.items()))
    assert value("bridge_calls_active") == 0 and value("bridge_calls_total") == 1
    assert value("bridge_calls_ended_total", reason="hangup") == 1
    assert value("bridge_upstream_connect_seconds_count") == 1
    assert value("bridge_response_latency_seconds_count") == 1
    assert value("bridge_event_loop_lag_seconds_count") > 0
    assert value("bridge_mic_packets_total") >= 5  # what the ended call counted stays counted
    assert value("bridge_playback_frames_total") >= 5
    assert value("bridge_offers_refused_total", reason="too_many_calls") == 0
    assert value("bridge_record_write_failures_total") == 0


def _decode_stereo(path: str):
    import av
    import numpy as np

    with av.open(path) as container:
        stream = container.streams.audio[0]
        channels = stream.codec_context.channels
        frames = [f.to_ndarray() for f in container.decode(stream)]
        rate = stream.codec_context.sample_rate
    data = np.concatenate(frames, axis=1)  # planar float: (channels, samples)
    if data.shape[0] == 1:  # packed
        data = data.reshape(-1, channels).T
    return channels, rate, data


async def test_a_recording_is_one_stereo_file_caller_left_model_right_as_heard(stub, start_bridge, new_caller,
                                                                              tmp_path):
    import numpy as np
    from pathlib import Path

    folder = tmp_path / "rec"
    bridge = await start_bridge(stub.url, auth_token=TOKEN, record_audio=str(folder))
    caller, session = await _call(bridge, stub, new_caller, freq=440)
    await asyncio.sleep(1.0)  # the caller speaks alone
    reply = asyncio.ensure_future(stub.respond(freq=1000, ms=4000))
    await caller.wait_event("output_audio_buffer.started")
    await asyncio.sleep(1.2)
    await stub.speech_started()  # cut: only what was heard belongs in the recording
    await eventually(lambda: session.events_of("conversation.item.truncate"), 5, "truncate")
    heard_ms = session.events_of("conversation.item.truncate")[0]["audio_end_ms"]
    await reply
    await asyncio.sleep(0.5)
    assert await caller.hangup() == 200
    path = Path(folder) / f"{caller.call_id}.ogg"
    await eventually(path.exists, 5, "the finished recording")
    channels, rate, data = _decode_stereo(str(path))
    assert channels == 2
    left, right = (np.clip(data[i] * 32767, -32768, 32767).astype("<i2") for i in (0, 1))
    win = rate // 10
    def level(x, i):
        return float(np.sqrt(np.mean((x[i * win:(i + 1) * win].astype(float) / 32768) ** 2)))
    n = len(right) // win
    loud_right = [i for i in range(n) if level(right, i) > 0.05]
    assert loud_right, "no model audio in the right channel"
    # the model's side: its tone, for as long as the caller heard it (not the 4 s it was sent)
    model = right[loud_right[0] * win:(loud_right[-1] + 1) * win]
    assert abs(dominant_frequency(model.tobytes(), rate) - 1000) < 15
    assert abs(len(loud_right) * 100 - heard_ms) <= 200, (len(loud_right) * 100, heard_ms)
    # the caller's side: its tone before and during the reply, on the same timeline
    before = left[max(0, loud_right[0] - 8) * win:loud_right[0] * win]
    during = left[loud_right[0] * win:(loud_right[-1] + 1) * win]
    assert abs(dominant_frequency(before.tobytes(), rate) - 440) < 15
    assert abs(dominant_frequency(during.tobytes(), rate) - 440) < 15
    assert level(right, max(0, loud_right[0] - 5)) < 0.01  # silence on the right before the reply
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{bridge.url}/v1/realtime/calls/{caller.call_id}", headers=AUTH) as r:
            assert (await r.json())["recording"] == str(path)
