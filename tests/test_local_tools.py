"""A tool-using agent with no API key and no internet: the embedded local backend with an
OpenAI-compatible chat model (here a chat-completions server in the test, standing in for
Ollama or llama.cpp) calls a server-run tool through the real bridge, and speaks the answer
to a real aiortc caller."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from harness.speech import recognize
from harness.web import chat_delta, serve_app, tools_toml
from tests.conftest import eventually
from tests.test_localrt import serve_local

TOOL_SECRET = "orders-service-secret-abcdef123456"


def _chat_server(requests: list):
    """Streams a call of `lookup_order` when the conversation has no tool result yet, and an
    answer quoting the result once it has (as a tool-calling chat model does)."""
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        requests.append(body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        result = next((m for m in reversed(body["messages"]) if m["role"] == "tool"), None)
        if result is None and body.get("tools"):
            args = json.dumps({"number": "A-1001"})
            for piece in ({"index": 0, "id": "call_abc123", "type": "function",
                           "function": {"name": "lookup_order", "arguments": args[:10]}},
                          {"index": 0, "function": {"arguments": args[10:]}}):  # arguments in two pieces
                await resp.write(chat_delta({"tool_calls": [piece]}))
        else:
            status = json.loads(result["content"])["status"] if result else "unknown"
            for text in ("Your order has been ", f"{status}. ", "It came two days early."):
                await resp.write(chat_delta({"content": text}))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    return app


def _orders_service(got: list):
    async def lookup(request: web.Request) -> web.Response:
        got.append({"auth": request.headers.get("Authorization"), "body": await request.json()})
        return web.json_response({"order": "A-1001", "status": "delivered"})

    app = web.Application()
    app.router.add_post("/lookup", lookup)
    return app


async def test_the_local_backend_calls_a_server_tool_and_speaks_its_result(start_bridge, new_caller, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv("ORDERS_TOKEN", TOOL_SECRET)
    chat_requests: list = []
    tool_requests: list = []
    chat, chat_url = await serve_app(_chat_server(chat_requests))
    orders, orders_url = await serve_app(_orders_service(tool_requests))
    tools = tmp_path / "tools.toml"
    tools.write_text(tools_toml(orders_url))
    try:
        async with serve_local(local_responder=f"{chat_url}/v1") as local_url:
            realtime = local_url.replace("http://", "ws://") + "/realtime"
            bridge = await start_bridge(realtime, tools_config=str(tools))
            caller = new_caller(bridge.url)
            await caller.connect()
            await caller.wait_event("session.updated", timeout=15)
            start = len(caller.audio)
            caller.send_event({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Where is order A-1001?"}]}})
            caller.send_event({"type": "response.create"})
            await eventually(lambda: any("delivered" in e.get("transcript", "")
                                         for e in caller.events_of("response.output_audio_transcript.done")), 30,
                             "the spoken answer")
            await caller.next_event("output_audio_buffer.stopped", timeout=30)
            heard = recognize(bytes(caller.audio[start:]), 48000)
            assert await caller.hangup() == 200
            await bridge.wait_no_calls()
    finally:
        await chat.cleanup()
        await orders.cleanup()
    # the model was given the tool in chat-completions' shape, then the result as a tool message
    first, second = chat_requests[0], chat_requests[-1]
    assert first["tools"][0]["function"]["name"] == "lookup_order"
    assert second["messages"][-2]["tool_calls"][0]["id"] == "call_abc123"
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_abc123",
                                      "content": json.dumps({"order": "A-1001", "status": "delivered"})}
    # the bridge ran it with its secret; the page saw the call, never the secret
    assert tool_requests == [{"auth": f"Bearer {TOOL_SECRET}", "body": {"number": "A-1001"}}]
    done = caller.events_of("response.function_call_arguments.done")
    assert done and json.loads(done[0]["arguments"]) == {"number": "A-1001"}
    assert TOOL_SECRET not in json.dumps(caller.events)
    assert "delivered" in heard.lower(), heard  # spoken, not only captioned


async def test_the_local_backend_takes_function_items_and_names_what_is_missing():
    import websockets

    async with serve_local() as local_url:
        async with websockets.connect(local_url.replace("http://", "ws://") + "/realtime") as ws:
            async def next_of(kind: str) -> dict:
                while True:
                    event = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if event["type"] == kind:
                        return event

            await next_of("session.created")
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "function_call_output", "output": "{}"}}))
            err = await next_of("error")
            assert err["error"]["param"] == "item.call_id"
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "function_call_output", "call_id": "call_1", "output": "{\"ok\": true}"}}))
            added = await next_of("conversation.item.added")
            assert added["item"]["type"] == "function_call_output" and added["item"]["call_id"] == "call_1"
