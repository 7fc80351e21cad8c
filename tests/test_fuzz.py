"""Seeded fuzzing of every input the server takes from outside: signaling requests, page
messages on `oai-events`, and upstream events from a hostile model server. Over 1,000
cases a run; each asserts what a user is owed: no 5xx, no traceback, every HTTP error in
the JSON shape, every refused page message answered with an error event, nothing outside
the policy upstream, no secret anywhere, and the server healthy after."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import random
import string

import aiohttp

from harness.stub import RealtimeStub
from realtime.events import CLIENT_EVENT_TYPES, SERVER_EVENT_TYPES
from realtime.policy import ClientEventPolicy
from tests.conftest import connected_call, eventually

SEED = 20261201
SECRET = "sk-fuzz-0123456789abcdefSECRETKEYxyz"
PATHS = ["/v1/realtime/calls", "/v1/realtime/calls/{id}/hangup", "/v1/realtime/client_secrets", "/healthz",
         "/metrics?since={x}", "/metrics.json?since={x}", "/config.json", "/client/{x}", "/", "/{x}", "/v1/realtime/calls/{id}"]
CTYPES = ["application/sdp", "application/json", "multipart/form-data; boundary={x}", "text/plain", None,
          "application/x-www-form-urlencoded", "{x}/{x}"]


def junk(rng: random.Random, n: int = 0) -> str:
    n = n or rng.randint(0, 40)
    alphabet = string.printable + "éü€\u0000\u2028\ud7ff"
    return "".join(rng.choice(alphabet) for _ in range(n))


def json_value(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if depth > 3 or roll < 0.3:
        return rng.choice([None, True, False, rng.randint(-2**40, 2**40), rng.random(), junk(rng), SECRET, ""])
    if roll < 0.65:
        return {rng.choice(["type", "sdp", "session", "audio", "item", "event_id", junk(rng, 5)]): json_value(rng, depth + 1)
                for _ in range(rng.randint(0, 4))}
    return [json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]


def mutate(rng: random.Random, text: str) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 8)):
        op, at = rng.random(), rng.randrange(max(1, len(chars)))
        if op < 0.4 and chars:
            del chars[at:at + rng.randint(1, 30)]
        elif op < 0.8:
            chars[at:at] = junk(rng, rng.randint(1, 20))
        else:
            chars[at:at] = chars[at:at + rng.randint(1, 200)] * rng.randint(1, 5)
    return "".join(chars)


def request_case(rng: random.Random, offer: str) -> tuple[str, str, dict]:
    roll = rng.random()  # most cases aim at the routes that parse bodies
    template = PATHS[0] if roll < 0.5 else PATHS[2] if roll < 0.65 else rng.choice(PATHS)
    path = template.format(id=rng.choice(["rtc_" + junk(rng, 8), "x" * rng.randint(0, 300), "w1", "..%2f"]),
                           x=aiohttp.helpers.quote(junk(rng, rng.randint(0, 300)), safe=""))
    method = "POST" if roll < 0.65 and rng.random() < 0.9 else rng.choice(["GET", "POST", "PUT", "DELETE", "OPTIONS"])
    ctype = rng.choice(CTYPES[:3]) if roll < 0.65 and rng.random() < 0.7 else rng.choice(CTYPES)
    headers = {}
    if ctype:
        headers["Content-Type"] = ctype.format(x=junk(rng, 6).replace("\n", ""))
    kind = rng.random()
    if kind < 0.3:
        body: bytes = mutate(rng, offer).encode("utf-8", "surrogatepass")
    elif kind < 0.55:
        body = json.dumps({"sdp": mutate(rng, offer) if rng.random() < 0.5 else json_value(rng),
                           "type": rng.choice(["offer", "answer", 3, None]), "session": json_value(rng),
                           "expires_after": json_value(rng)}).encode()
    elif kind < 0.65:
        body = b"[" * rng.randint(100, 20000) + b"]" * rng.randint(0, 100)
    elif kind < 0.8:
        body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 3000)))
    elif kind < 0.9:
        boundary = rng.choice(["b", junk(rng, 5)])
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{rng.choice(['sdp', 'session', junk(rng, 4)])}\""
                f"\r\n\r\n{mutate(rng, offer)}\r\n--{boundary}--\r\n").encode("utf-8", "surrogatepass")
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    else:
        body = b"x" * rng.choice([65 * 1024, 70_000, 10])
    if rng.random() < 0.1:
        headers["Content-Encoding"] = rng.choice(["gzip", "deflate", "br", junk(rng, 4)])
        if rng.random() < 0.5:
            body = gzip.compress(body)
    if rng.random() < 0.3:
        headers["Authorization"] = rng.choice(["Bearer " + junk(rng, 30), "Bearer " + SECRET, junk(rng, 10), "Bearer ek_" + junk(rng, 40)])
    # what an HTTP client can send at all: latin-1, no control characters
    headers = {k: "".join(c for c in v.encode("latin-1", "replace").decode("latin-1") if c >= " " and c != "\x7f")
               for k, v in headers.items()}
    return method, path, {"data": body, "headers": headers}


async def test_fuzzed_signaling_requests_never_get_a_5xx_or_leave_a_traceback(stub, start_bridge, new_caller, caplog):
    # 700 requests from one address: the per-address offer limits (tested on their own) would
    # answer most of them with 429 before their bodies were parsed
    bridge = await start_bridge(stub.url, offers_per_minute="0", pending_offers_per_address="0")
    caplog.set_level(logging.WARNING)
    rng = random.Random(SEED)
    caller = new_caller(bridge.url)  # only for a real browser-like offer to mutate
    caller.pc.addTrack(caller.source)
    caller.pc.createDataChannel("oai-events")
    await caller.pc.setLocalDescription(await caller.pc.createOffer())
    offer = caller.pc.localDescription.sdp
    statuses: dict[int, int] = {}
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        for _ in range(700):
            method, path, kwargs = request_case(rng, offer)
            async with http.request(method, bridge.url + path, **kwargs) as r:
                body = await r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1
                assert r.status < 500, (method, path, r.status, body[:300])
                assert SECRET.encode() not in body
                if r.status >= 400 and method != "OPTIONS":
                    assert set(json.loads(body)["error"]) >= {"type", "code", "message"}, (method, path, body[:200])
        async with http.get(bridge.url + "/healthz") as r:
            assert r.status == 200
    for call in list(bridge.registry.calls.values()):  # offers that happened to be valid
        call.end("fuzz over")
    await bridge.wait_no_calls(20)
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()], \
        [r.getMessage() for r in caplog.records][:5]
    assert sum(statuses.values()) == 700 and statuses.get(400, 0) > 100


def page_message(rng: random.Random) -> str | bytes:
    roll = rng.random()
    if roll < 0.5:
        event = {"type": rng.choice(sorted(CLIENT_EVENT_TYPES) + [junk(rng, 12), "session.update"]),
                 "event_id": rng.choice([junk(rng, 8), None, 5])}
        for _ in range(rng.randint(0, 4)):
            event[rng.choice(["session", "item", "response", "audio", "item_id", junk(rng, 6)])] = json_value(rng)
        if event["type"] == "input_audio_buffer.append":
            event["type"] = "input_audio_buffer.clear"  # the page's audio goes on RTP; appends are not allowed anyway
        return json.dumps(event)
    if roll < 0.65:
        return json.dumps(json_value(rng))
    if roll < 0.75:
        return "[" * rng.randint(30, 3000) + "]" * rng.randint(0, 30)
    if roll < 0.85:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 500)))
    if roll < 0.92:
        return json.dumps({"type": "session.update", "session": {junk(rng, 8): junk(rng, 2000) for _ in range(20)}})
    return junk(rng, rng.randint(1, 300))


async def test_fuzzed_page_messages_are_each_answered_and_only_the_policy_reaches_the_upstream(bridge, stub, new_caller):
    rng = random.Random(SEED + 1)
    caller, session = await connected_call(bridge, stub, new_caller)
    policy = ClientEventPolicy(bridge.settings.client_events, bridge.settings.session_fields)
    expected_errors = 0
    errors_before = len(caller.events_of("error"))
    for _ in range(350):
        message = page_message(rng)
        expected_errors += len(policy.check(message).errors)
        caller.channel.send(message)
        await asyncio.sleep(0.002)
    caller.channel.send(json.dumps({"type": "conversation.item.retrieve", "item_id": "last"}))
    await asyncio.sleep(1.0)
    page_errors = [e for e in caller.events_of("error")[errors_before:]
                   if "Call ended" not in e["error"]["message"]]
    # every refused message got its error (the stub adds its own for some that passed)
    assert len(page_errors) >= expected_errors > 50
    assert caller.call_id in bridge.registry.calls  # the call survived all of it
    allowed_fields = set(bridge.settings.session_fields)
    own = {"conversation.item.truncate"}  # the bridge's own, at a barge-in the page asked for
    for event in session.received:
        assert event["type"] in bridge.settings.client_events or event["type"] in own, event["type"]
        if event["type"] == "session.update" and event is not session.received[0]:
            assert all(k in {f.split(".")[0] for f in allowed_fields} for k in event["session"]), event["session"]


async def test_fuzzed_sideband_messages_are_each_answered_on_the_sideband_and_the_call_goes_on(stub, start_bridge,
                                                                                          new_caller):
    import websockets

    from settings import SIDEBAND_SESSION_FIELDS

    rng = random.Random(SEED + 3)
    bridge = await start_bridge(stub.url, operator_on_loopback="true")
    caller, session = await connected_call(bridge, stub, new_caller)
    policy = ClientEventPolicy(bridge.settings.sideband_client_events, SIDEBAND_SESSION_FIELDS)
    expected = 0
    got = 0
    url = bridge.url.replace("http://", "ws://") + f"/v1/realtime?call_id={caller.call_id}"
    async with websockets.connect(url, max_size=None) as ws:
        async def drain() -> None:
            nonlocal got
            try:
                async for message in ws:
                    if json.loads(message).get("type") == "error":
                        got += 1
            except websockets.ConnectionClosed:
                pass

        reader = asyncio.create_task(drain())
        for _ in range(250):
            message = page_message(rng)
            if isinstance(message, bytes):
                message = message.decode("utf-8", "replace")
            expected += len(policy.check(message).errors)
            await ws.send(message)
        await ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": "last"}))
        await eventually(lambda: got >= expected, 10, "an error on the sideband for each refused message")
        await ws.close()
        await reader
    assert expected > 30 and caller.call_id in bridge.registry.calls  # the call survived all of it
    for event in session.received:
        assert event["type"] in bridge.settings.sideband_client_events or event["type"] in (
            "conversation.item.truncate", "session.update"), event["type"]


def upstream_event(rng: random.Random) -> str:
    kind = rng.choice(sorted(SERVER_EVENT_TYPES) + [junk(rng, 10)])
    event = {"type": kind if rng.random() < 0.9 else json_value(rng)}
    for _ in range(rng.randint(0, 5)):
        event[rng.choice(["response", "session", "error", "item", "delta", "transcript", "item_id", "response_id",
                          "part", junk(rng, 5)])] = json_value(rng)
    if kind.endswith("audio.delta") and rng.random() < 0.5:
        event["delta"] = base64.b64encode(bytes(rng.randrange(256) for _ in range(960))).decode()
    if rng.random() < 0.1:
        event["transcript"] = f"the key is {SECRET}"
    roll = rng.random()
    if roll < 0.05:
        return json.dumps(json_value(rng))
    if roll < 0.08:
        return "{" * rng.randint(1, 5000)
    return json.dumps(event)


async def test_a_hostile_upstream_cannot_break_the_call_or_leak_the_key(start_bridge, new_caller, caplog):
    caplog.set_level(logging.WARNING)
    rng = random.Random(SEED + 2)
    async with RealtimeStub() as stub:
        bridge = await start_bridge(stub.url, api_key=SECRET)
        caller, session = await connected_call(bridge, stub, new_caller)
        for _ in range(300):
            await session.ws.send(upstream_event(rng))
        await session.send({"type": "response.output_text.delta", "delta": "the end"})
        for _ in range(200):
            if [e for e in caller.events if e.get("delta") == "the end"]:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the call stopped relaying")
        assert caller.call_id in bridge.registry.calls
        assert SECRET not in json.dumps(caller.events)
        assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info][:3]
        assert SECRET not in "\n".join(r.getMessage() for r in caplog.records)
