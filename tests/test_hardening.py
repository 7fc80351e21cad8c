"""Hostile inputs and faults, each found by outside testing: secrets stay in, bad input gets a
precise answer, nothing ends a call that should not, and the server keeps serving."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import time

import aiohttp
import pytest

from harness.stub import RealtimeStub
from realtime import call as call_module
from signaling.auth import KeyRing
from tests.conftest import connected_call, eventually

SECRET = "sk-proj-Th1sIsTheUpstreamKey0123456789abcdef"


async def test_an_upstream_that_echoes_the_key_never_puts_it_on_the_page_or_in_the_log(start_bridge, new_caller, caplog):
    caplog.set_level(logging.INFO)
    async with RealtimeStub() as stub:
        bridge = await start_bridge(stub.url, api_key=SECRET)
        caller, session = await connected_call(bridge, stub, new_caller)
        assert {k.lower(): v for k, v in session.headers.items()}["authorization"] == f"Bearer {SECRET}"  # it got it
        await session.send({"type": "error", "error": {"type": "invalid_request_error", "code": "invalid_api_key",
                                                       "message": f"Incorrect API key provided: Bearer {SECRET}."}})
        await session.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": "i1",
                            "content_index": 0, "transcript": f"my key is {SECRET} and sk-other0123456789xyz"})
        await caller.wait_event("conversation.item.input_audio_transcription.completed")
        await stub.drop(1008, f"invalid key {SECRET[:40]}")
        ended = await eventually_event(caller, "Call ended")
        await bridge.wait_no_calls()
    page = json.dumps(caller.events)
    assert SECRET not in page and SECRET[:40] not in page and "sk-other0123456789xyz" not in page
    assert "[redacted]" in page and "code 1008" in ended["error"]["message"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert SECRET[:40] not in logged and "invalid_api_key" in logged


async def eventually_event(caller, text: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in caller.events:
            if e.get("type") == "error" and text in e["error"]["message"]:
                return e
        await asyncio.sleep(0.05)
    raise AssertionError(f"no error event with {text!r}: {caller.events[-3:]}")


async def test_a_normal_upstream_close_is_reported_with_its_code(bridge, stub, new_caller):
    caller, _ = await connected_call(bridge, stub, new_caller)
    await stub.drop(1000, "bye")
    ended = await eventually_event(caller, "Call ended")
    assert "code 1000: bye" in ended["error"]["message"]
    assert "internal error" not in ended["error"]["message"]


MALFORMED = [
    {"type": "response.created", "response": "resp_1"},
    {"type": "response.done", "response": ["x"]},
    {"type": "response.done", "response": {"id": 42}},
    {"type": "session.updated", "session": "nope"},
    {"type": "error", "error": "just a string"},
    {"type": "error", "error": {"message": {"nested": True}}},
    {"type": "response.output_audio.delta", "delta": 12345, "item_id": "i"},
    {"type": "response.output_audio.delta", "delta": "!!not base64!!", "item_id": "i"},
    {"type": "response.output_audio.delta", "delta": "AAAA", "item_id": ["i"]},
    {"type": "input_audio_buffer.speech_started", "item_id": {"x": 1}},
    {"type": 7},
    {"no_type": True},
    {"type": ""},
    ["an", "array"],
    "a string",
    12,
    None,
]


async def test_malformed_upstream_events_are_dropped_and_counted_never_fatal(bridge, stub, new_caller):
    caller, session = await connected_call(bridge, stub, new_caller)
    call = bridge.registry.calls[caller.call_id]
    for event in MALFORMED:
        await session.ws.send(json.dumps(event))
    await session.ws.send("{not json")
    await session.ws.send(json.dumps({"type": "response.output_text.delta", "delta": "still alive"}))
    await caller.wait_event("response.output_text.delta")
    assert caller.call_id in bridge.registry.calls  # the call is up
    assert call.malformed_upstream_events + call.upstream.malformed_events == len(MALFORMED) + 1
    relayed = [e.get("type") for e in caller.events]
    assert 7 not in relayed and None not in relayed and "" not in relayed
    assert not [e for e in caller.events if e.get("response") == "resp_1"]


async def test_an_upstream_that_accepts_and_says_nothing_fails_the_call_clearly(start_bridge, new_caller, monkeypatch):
    monkeypatch.setattr(call_module, "SESSION_CREATED_TIMEOUT_S", 1.0)
    async with RealtimeStub() as stub:
        stub.silent = True
        bridge = await start_bridge(stub.url)
        caller = new_caller(bridge.url)
        await caller.connect()
        ended = await eventually_event(caller, "no session.created")
        assert "within 1 s" in ended["error"]["message"]
        await bridge.wait_no_calls()


async def test_an_upstream_429_becomes_503_with_retry_after(start_bridge, new_caller):
    async with RealtimeStub() as stub:
        stub.refuse_status, stub.refuse_headers = 429, {"Retry-After": "7"}
        bridge = await start_bridge(stub.url)
        caller = new_caller(bridge.url)
        with pytest.raises(RuntimeError, match="offer refused: 503") as exc:
            await caller.connect()
        assert "upstream_busy" in str(exc.value)
        async with aiohttp.ClientSession() as http:  # and the header, on the same kind of refusal
            async with http.post(bridge.url + "/v1/realtime/calls", data=caller.pc.localDescription.sdp,
                                 headers={"Content-Type": "application/sdp"}) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "7"
                assert (await r.json())["error"]["code"] == "upstream_busy"


async def test_a_page_message_nested_a_thousand_deep_gets_an_error_and_the_call_goes_on(bridge, stub, new_caller):
    caller, session = await connected_call(bridge, stub, new_caller)
    caller.send_event("[" * 1000 + "]" * 1000)
    err = await caller.wait_event("error")
    assert "nests deeper" in err["error"]["message"]
    caller.send_event({"type": "response.create"})
    await eventually(lambda: session.events_of("response.create"), what="the next event upstream")


async def test_a_huge_session_update_gets_an_error_reply_that_fits_the_page(bridge, stub, new_caller):
    caller, session = await connected_call(bridge, stub, new_caller)
    junk = {f"field_{i:05d}_{'x' * 20}": i for i in range(2800)}  # ≈ 100 KB of fields nobody may set
    caller.send_event({"type": "session.update", "session": {"instructions": "hi", **junk}})
    err = await caller.wait_event("error", timeout=15)
    assert err["error"]["code"] == "session_fields_not_allowed" and len(json.dumps(err)) < 4096
    await eventually(lambda: [e for e in session.events_of("session.update") if e["session"].get("instructions") == "hi"],
                     what="the allowed part upstream")
    assert caller.call_id in bridge.registry.calls


async def test_an_upstream_event_larger_than_the_page_accepts_is_split_and_captions_keep_working(bridge, stub, new_caller):
    caller, session = await connected_call(bridge, stub, new_caller)
    text = "word " * 60_000  # 300 KB in one transcript delta
    await session.send({"type": "response.output_audio_transcript.delta", "response_id": "r", "item_id": "i",
                        "output_index": 0, "content_index": 0, "delta": text})
    await session.send({"type": "response.output_audio_transcript.done", "response_id": "r", "item_id": "i",
                        "output_index": 0, "content_index": 0, "transcript": text})
    await caller.wait_event("response.output_audio_transcript.done", timeout=15)
    deltas = caller.events_of("response.output_audio_transcript.delta")
    assert len(deltas) > 1 and "".join(d["delta"] for d in deltas) == text  # the same text, in pieces
    done = caller.events_of("response.output_audio_transcript.done")[0]
    assert done["transcript"].endswith("[truncated to fit the data channel]")
    assert caller.call_id in bridge.registry.calls


def test_ephemeral_keys_are_stateless_any_worker_with_the_token_verifies_them():
    minted_here, elsewhere, stranger = KeyRing("operator-token"), KeyRing("operator-token"), KeyRing("other-token")
    key = minted_here.mint(60, {"instructions": "Be brief."})
    got = elsewhere.ephemeral(key.value)
    assert got is not None and got.session == {"instructions": "Be brief."}
    assert stranger.ephemeral(key.value) is None
    claims, _, signature = key.value.partition(".")
    assert elsewhere.ephemeral(claims + "." + signature[::-1]) is None
    assert elsewhere.ephemeral(claims[:-2] + "AA." + signature) is None
    assert elsewhere.ephemeral("ek_nonsense") is None and elsewhere.ephemeral("ek_é.ü") is None
    past = minted_here.mint(10, None)
    past_ring = KeyRing("operator-token")
    assert past_ring.ephemeral(past.value) is not None
    assert not KeyRing("operator-token").is_token("opérateur")  # non-ASCII: a clean no, not a crash


async def _request(bridge, method: str, path: str, **kwargs):
    async with aiohttp.ClientSession() as http:
        async with http.request(method, bridge.url + path, **kwargs) as r:
            return r.status, r.headers.get("Content-Type", ""), await r.text()


@pytest.mark.parametrize("method, path, kwargs, status", [
    ("POST", "/v1/realtime/calls", {"data": b"[" * 5000 + b"]" * 5000, "headers": {"Content-Type": "application/json"}}, 400),
    ("POST", "/v1/realtime/calls", {"data": b"--b\r\nContent-Disposition: form-data; name=\"sdp\"\r\n\r\nv=0",
                                    "headers": {"Content-Type": "multipart/form-data; boundary=b"}}, 400),
    ("POST", "/v1/realtime/calls", {"data": b"\x1f\x8b not gzip at all",
                                    "headers": {"Content-Type": "application/sdp", "Content-Encoding": "gzip"}}, 415),
    ("POST", "/v1/realtime/client_secrets", {"data": gzip.compress(b"{}")[:8],
                                             "headers": {"Content-Type": "application/json", "Content-Encoding": "deflate"}}, 415),
    ("POST", "/nope", {"data": b"\x1f\x8bxxxx", "headers": {"Content-Encoding": "deflate"}}, 415),
    ("GET", "/client/" + "a" * 5000, {}, 404),
    ("GET", "/client/nope.js", {}, 404),
    ("GET", "/client/..%2Fsettings.py", {}, 404),
    ("POST", "/v1/realtime/client_secrets", {"json": {"expires_after": "soon"}}, 400),
    ("POST", "/v1/realtime/client_secrets", {"json": {"expires_after": {"seconds": "600"}}}, 400),
    ("POST", "/v1/realtime/calls", {"data": "v=0", "headers": {"Content-Type": "application/sdp",
                                                               "Authorization": "Bearer jéton"}}, 400),
])
async def test_bad_requests_get_a_precise_json_error_never_a_500(bridge, method, path, kwargs, status):
    got, ctype, body = await _request(bridge, method, path, **kwargs)
    assert got == status, body
    assert ctype.startswith("application/json")
    assert set(json.loads(body)["error"]) >= {"type", "code", "message"}
    assert (await _request(bridge, "GET", "/healthz"))[0] == 200


async def test_a_non_ascii_bearer_is_refused_with_401_when_a_token_is_required(stub, start_bridge):
    bridge = await start_bridge(stub.url, auth_token="operator-token")
    status, _, body = await _request(bridge, "POST", "/v1/realtime/calls", data="v=0",
                                     headers={"Content-Type": "application/sdp", "Authorization": "Bearer jéton"})
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"


def test_a_flood_of_one_log_line_is_summarised_not_written_a_thousand_times():
    from signaling.loglimit import RepeatLimiter

    limiter = RepeatLimiter(burst=5, interval=0.2)
    passed = [r for r in (logging.LogRecord("asyncio", logging.ERROR, "x", 1, "socket.accept() out of system resource",
                                            None, None) for _ in range(1000)) if limiter.filter(r)]
    assert len(passed) == 5
    time.sleep(0.25)
    later = logging.LogRecord("asyncio", logging.ERROR, "x", 1, "socket.accept() out of system resource", None, None)
    assert limiter.filter(later) and "995 more like this" in later.getMessage()


async def test_a_connection_that_never_sends_a_byte_is_closed(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import server

    assert server.IDLE_TIMEOUT_S <= 30
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "REALTIME_URL": "ws://127.0.0.1:9/v1/realtime"}
    code = f"import server; server.IDLE_TIMEOUT_S = 1.0; server.main()"
    proc = subprocess.Popen([sys.executable, "-c", code, "--port", str(port), "--env-file", "/nonexistent"],
                            cwd=Path(__file__).resolve().parent.parent, env=env, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                idle = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                await asyncio.sleep(0.1)
        started = time.monotonic()
        idle.settimeout(10)
        assert idle.recv(1) == b""  # the server hung up on the silent connection
        assert time.monotonic() - started < 5
        idle.close()
    finally:
        proc.terminate()
        proc.wait(10)


async def test_a_loaded_process_refuses_new_calls_with_503_and_says_not_ready(bridge, new_caller):
    from signaling.admission import SETTLE_S, Admission
    from signaling.routes import ADMISSION

    status, _, body = await _request(bridge, "GET", "/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    lag = {"p99": 5.0}
    now = {"t": 0.0}
    bridge.app[ADMISSION] = Admission(lambda: lag["p99"], lambda: 0.0, clock=lambda: now["t"])
    lag["p99"] = 120.0  # the event loop is waking 120 ms late: calls would stutter
    caller = new_caller(bridge.url)
    with pytest.raises(RuntimeError, match="offer refused: 503") as refused:
        await caller.connect()
    assert "server_overloaded" in str(refused.value) and "event-loop lag" in str(refused.value)
    status, _, body = await _request(bridge, "GET", "/readyz")
    assert status == 503 and json.loads(body)["error"]["code"] == "not_ready"
    lag["p99"] = 5.0  # load gone: calls are taken again once it has stayed gone for SETTLE_S
    status, _, body = await _request(bridge, "GET", "/readyz")
    assert status == 503 and "settling" in json.loads(body)["error"]["message"]
    now["t"] += SETTLE_S
    await new_caller(bridge.url).connect()
    assert len(bridge.registry.calls) == 1


def test_admission_reads_lateness_and_cpu_too():
    from signaling.admission import Admission, ProcessCpu

    class Busy(ProcessCpu):
        def cores(self) -> float:
            return 0.97

    assert "late by 45 ms" in Admission(lambda: 1.0, lambda: 45.0).overload()
    assert "CPU at 0.97" in Admission(lambda: 1.0, lambda: 1.0, cpu=Busy()).overload()
    assert Admission(lambda: 1.0, lambda: 1.0).overload() is None


def test_admission_counts_calls_admitted_too_recently_to_show_in_the_cpu():
    from signaling.admission import Admission, ProcessCpu

    class Steady(ProcessCpu):
        def cores(self) -> float:
            return 0.7  # the last seconds' CPU, before the newest calls' cost shows

    active = {"n": 30}
    admission = Admission(lambda: 1.0, lambda: 1.0, cpu=Steady(), active_calls=lambda: active["n"])
    assert admission.overload() is None  # 0.7 cores for 30 calls, none of them new
    for _ in range(6):  # six calls in the last seconds, only partly in the 0.7 measured
        admission.admitted()
    active["n"] = 30
    assert abs(admission.projected_cores() - 0.84) < 1e-6
    assert "counting the calls just admitted" in admission.overload()


def test_a_refusing_process_takes_calls_again_only_well_below_the_limit_and_after_settling():
    from signaling.admission import RESUME, SETTLE_S, Admission

    lag = {"p95": 30.0}
    now = {"t": 100.0}
    admission = Admission(lambda: lag["p95"], lambda: 0.0, clock=lambda: now["t"])
    assert "event-loop lag" in admission.overload()  # over the 25 ms limit
    lag["p95"] = 24.0  # under the limit, but not by much: still refusing
    assert "event-loop lag" in admission.overload()
    lag["p95"] = 25.0 * RESUME - 0.5  # well below: it settles first
    assert "settling" in admission.overload()
    now["t"] += SETTLE_S / 2
    assert "settling" in admission.overload()
    lag["p95"] = 24.0  # a wobble back up restarts the settling
    assert "event-loop lag" in admission.overload()
    lag["p95"] = 25.0 * RESUME - 0.5
    assert "settling" in admission.overload()
    now["t"] += SETTLE_S
    assert admission.overload() is None
    lag["p95"] = 24.0  # taking calls again: the full limit applies
    assert admission.overload() is None
