"""The local backend, driven by the official `openai` SDK's realtime client over a real WebSocket."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time

import pytest
from aiohttp import web
from openai import AsyncOpenAI

import settings as config
from localrt.server import build_local_app
from harness.speech import read_pcm, recognize, speech_wav
from harness.web import chat_delta

UTTERANCE = "What is the weather like today?"


@contextlib.asynccontextmanager
async def serve_local(**raw: str):
    """The local backend on a free port; yields the base URL the SDK wants."""
    runner = web.AppRunner(build_local_app(config.from_raw(raw)))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


@pytest.fixture
async def local_url():
    async with serve_local() as url:
        yield url


@pytest.fixture(scope="module")
def utterance_pcm(tmp_path_factory) -> bytes:
    pcm, rate = read_pcm(speech_wav(UTTERANCE, tmp_path_factory.mktemp("speech") / "u.wav", rate=24000, pad_s=1.5))
    assert rate == 24000
    return pcm


def sdk(url: str) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="local-no-key-needed", base_url=url)


async def until(conn, kind: str, timeout: float = 20.0, seen: list | None = None):
    async def scan():
        async for event in conn:
            if seen is not None:
                seen.append(event)
            if event.type == kind:
                return event
    return await asyncio.wait_for(scan(), timeout)


async def ask(conn, text: str) -> tuple[object, list]:
    """A user text item, then response.create; returns response.done and every event up to it."""
    await conn.conversation.item.create(item={"type": "message", "role": "user",
                                              "content": [{"type": "input_text", "text": text}]})
    await conn.response.create()
    seen: list = []
    done = await until(conn, "response.done", seen=seen)
    return done, seen


async def stream_realtime(conn, pcm: bytes, speed: float = 1.0) -> None:
    """Send 20 ms appends paced like a live microphone."""
    start = time.monotonic()
    for n, i in enumerate(range(0, len(pcm), 960)):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + 960]).decode())
        wait = start + (n + 1) * 0.02 / speed - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)


async def test_session_update_round_trip_returns_the_full_effective_config(local_url):
    async with sdk(local_url).realtime.connect(model="local-test") as conn:
        created = await until(conn, "session.created")
        assert created.session.model == "local-test"
        await conn.session.update(session={"type": "realtime", "instructions": "Be terse.",
                                           "audio": {"output": {"voice": "coral", "speed": 1.2},
                                                     "input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 400}}}})
        updated = await until(conn, "session.updated")
        s = updated.session
        assert s.instructions == "Be terse."
        assert s.audio.output.voice == "coral" and s.audio.output.speed == 1.2
        assert s.audio.input.turn_detection.silence_duration_ms == 400
        assert s.audio.input.turn_detection.threshold == 0.5  # unchanged fields stay
        assert s.audio.input.format.rate == 24000


async def test_invalid_session_values_get_an_error_with_param_and_change_nothing(local_url):
    async with sdk(local_url).realtime.connect(model="m") as conn:
        await until(conn, "session.created")
        await conn.send({"type": "session.update", "session": {"type": "realtime",
                         "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 2}}}}})
        err = await until(conn, "error")
        assert err.error.param == "session.audio.input.turn_detection.threshold"
        await conn.session.update(session={"type": "realtime", "instructions": "still alive"})
        assert (await until(conn, "session.updated")).session.audio.input.turn_detection.threshold == 0.5


async def test_a_spoken_utterance_is_detected_transcribed_and_answered_with_recognisable_speech(local_url, utterance_pcm):
    async with sdk(local_url).realtime.connect(model="m") as conn:
        await until(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "audio": {"input": {
            "transcription": {"model": "whisper-1"},
            "turn_detection": {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 500}}}})
        await until(conn, "session.updated")
        seen: list = []
        sender = asyncio.ensure_future(stream_realtime(conn, utterance_pcm))
        started = await until(conn, "input_audio_buffer.speech_started", seen=seen)
        stopped = await until(conn, "input_audio_buffer.speech_stopped", seen=seen)
        assert 0 <= started.audio_start_ms < stopped.audio_end_ms
        assert started.item_id == stopped.item_id
        spoken_ms = len(utterance_pcm) // 48
        assert stopped.audio_end_ms <= spoken_ms
        transcript = await until(conn, "conversation.item.input_audio_transcription.completed", seen=seen)
        assert "weather" in transcript.transcript.lower()
        done = await until(conn, "response.done", seen=seen)
        await sender
        assert done.response.status == "completed"
        kinds = [e.type for e in seen]
        first = {k: kinds.index(k) for k in set(kinds)}
        last = {k: len(kinds) - 1 - kinds[::-1].index(k) for k in set(kinds)}
        deltas = ("response.output_audio.delta", "response.output_audio_transcript.delta")
        assert first["response.created"] < first["response.output_item.added"] < first["response.content_part.added"] \
            < min(first[d] for d in deltas)
        assert max(last[d] for d in deltas) < first["response.output_audio.done"] \
            < first["response.output_audio_transcript.done"] < first["response.content_part.done"] \
            < first["response.output_item.done"] < first["response.done"]
        reply = b"".join(base64.b64decode(e.delta) for e in seen if e.type == "response.output_audio.delta")
        text = next(e.transcript for e in seen if e.type == "response.output_audio_transcript.done")
        assert "weather" in text.lower() and text.startswith("You said")
        heard = recognize(reply, 24000).lower()
        assert {"weather", "said"} & set(heard.split()), heard
        assert done.response.usage.total_tokens > 0


async def test_client_committed_turns_and_the_empty_commit_error(local_url, utterance_pcm):
    async with sdk(local_url).realtime.connect(model="m") as conn:
        await until(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None,
                                                                                   "transcription": {"model": "x"}}}})
        await until(conn, "session.updated")
        await conn.input_audio_buffer.append(audio=base64.b64encode(utterance_pcm[:2400]).decode())  # 50 ms
        await conn.input_audio_buffer.commit()
        assert (await until(conn, "error")).error.code == "input_audio_buffer_commit_empty"
        await conn.input_audio_buffer.clear()
        await until(conn, "input_audio_buffer.cleared")
        for i in range(0, len(utterance_pcm), 48000):
            await conn.input_audio_buffer.append(audio=base64.b64encode(utterance_pcm[i:i + 48000]).decode())
        await conn.input_audio_buffer.commit()
        committed = await until(conn, "input_audio_buffer.committed")
        transcript = await until(conn, "conversation.item.input_audio_transcription.completed")
        assert transcript.item_id == committed.item_id and "weather" in transcript.transcript
        await conn.response.create()
        done = await until(conn, "response.done")
        assert done.response.status == "completed"


LONG_TEXT = " ".join(f"Sentence number {i} is here." for i in range(30))


@contextlib.asynccontextmanager
async def slow_chat_backend(sentences: int = 40, every_s: float = 0.3):
    """The local backend answering through a chat-completions server that streams a sentence
    every `every_s`: its responses stay active for seconds, whatever the speed of the TTS
    (Piper synthesises far faster than real time, so an echoed text is done in a blink)."""
    async def completions(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(sentences):
                await resp.write(chat_delta({"content": f"Sentence number {i} is here. "}))
                await asyncio.sleep(every_s)
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionError:
            pass  # the response was cancelled: the backend hung up
        return resp

    chat = web.Application()
    chat.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(chat)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        async with serve_local(local_responder=f"http://127.0.0.1:{runner.addresses[0][1]}/v1") as url:
            yield url
    finally:
        await runner.cleanup()


async def test_cancel_ends_the_active_response_and_cancel_without_one_is_an_error():
    async with slow_chat_backend() as local_url, sdk(local_url).realtime.connect(model="m") as conn:
        await until(conn, "session.created")
        await conn.response.cancel()
        assert (await until(conn, "error")).error.code == "response_cancel_not_active"
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": LONG_TEXT}]})
        await conn.response.create()
        await until(conn, "response.output_audio.delta")
        await conn.response.create()
        assert (await until(conn, "error")).error.code == "conversation_already_has_active_response"
        await conn.response.cancel()
        done = await until(conn, "response.done")
        assert done.response.status == "cancelled"


async def test_truncate_cuts_the_transcript_to_what_was_heard_and_refuses_beyond_the_audio(local_url):
    async with sdk(local_url).realtime.connect(model="m") as conn:
        await until(conn, "session.created")
        done, seen = await ask(conn, "one two three. four five six.")
        item_id = done.response.output[0].id
        audio_ms = sum(len(base64.b64decode(e.delta)) for e in seen if e.type == "response.output_audio.delta") // 48
        await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=audio_ms + 100)
        err = await until(conn, "error")
        assert err.error.param == "audio_end_ms" and "shorter" in err.error.message
        await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=audio_ms // 3)
        truncated = await until(conn, "conversation.item.truncated")
        assert truncated.audio_end_ms == audio_ms // 3
        await conn.conversation.item.retrieve(item_id=item_id)
        item = (await until(conn, "conversation.item.retrieved")).item
        heard = item.content[0].transcript
        full = next(e.transcript for e in seen if e.type == "response.output_audio_transcript.done")
        assert heard and len(heard) < len(full) and full.startswith(heard.rstrip(".")[:5])
        await conn.conversation.item.delete(item_id=item_id)
        assert (await until(conn, "conversation.item.deleted")).item_id == item_id
        await conn.conversation.item.retrieve(item_id=item_id)
        assert (await until(conn, "error")).error.code == "item_not_found"


async def test_malformed_and_unknown_events_get_errors_and_the_session_stays_open(local_url):
    async with sdk(local_url).realtime.connect(model="m") as conn:
        await until(conn, "session.created")
        ws = conn._connection  # the SDK's raw socket, to send what the SDK would refuse to build
        await ws.send("{not json")
        assert (await until(conn, "error")).error.code == "invalid_json"
        await ws.send('{"type":"no.such.event"}')
        assert (await until(conn, "error")).error.code == "unknown_event_type"
        await ws.send('{"type":"input_audio_buffer.append","audio":"***"}')
        assert (await until(conn, "error")).error.param == "audio"
        await conn.session.update(session={"type": "realtime", "instructions": "ok"})
        await until(conn, "session.updated")


async def test_two_spoken_sessions_at_once_both_complete(local_url, utterance_pcm):
    async def one() -> str:
        async with sdk(local_url).realtime.connect(model="m") as conn:
            await until(conn, "session.created")
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"transcription": {"model": "x"}}}})
            await until(conn, "session.updated")
            sender = asyncio.ensure_future(stream_realtime(conn, utterance_pcm))
            transcript = await until(conn, "conversation.item.input_audio_transcription.completed", timeout=30)
            done = await until(conn, "response.done", timeout=30)
            await sender
            assert done.response.status == "completed"
            return transcript.transcript

    a, b = await asyncio.gather(one(), one())
    assert "weather" in a and "weather" in b


async def test_a_chat_completions_server_answers_with_the_instructions_and_the_conversation(utterance_pcm):
    """LOCAL_RESPONDER pointed at an OpenAI-compatible chat server (a real HTTP server streaming SSE)."""
    seen_requests = []

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen_requests.append(body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in ["It is sunny. ", "Take a hat", "."]:
            await resp.write(chat_delta({"content": piece}))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    chat = web.Application()
    chat.router.add_post("/v1/chat/completions", completions)
    chat_runner = web.AppRunner(chat)
    await chat_runner.setup()
    await web.TCPSite(chat_runner, "127.0.0.1", 0).start()
    chat_url = f"http://127.0.0.1:{chat_runner.addresses[0][1]}/v1"
    try:
        async with serve_local(local_responder=chat_url, local_llm_model="tiny") as url:
            async with sdk(url).realtime.connect(model="m") as conn:
                await until(conn, "session.created")
                await conn.session.update(session={"type": "realtime", "instructions": "Answer about the weather."})
                await until(conn, "session.updated")
                done, seen = await ask(conn, "Weather?")
        assert done.response.status == "completed"
        transcript = next(e.transcript for e in seen if e.type == "response.output_audio_transcript.done")
        assert transcript == "It is sunny. Take a hat."
        # spoken sentence by sentence: audio for the first sentence precedes the second's transcript
        kinds = [e.type for e in seen]
        deltas = [i for i, k in enumerate(kinds) if k == "response.output_audio_transcript.delta"]
        assert len(deltas) == 2 and "response.output_audio.delta" in kinds[deltas[0]:deltas[1]]
        (req,) = seen_requests
        assert req["model"] == "tiny" and req["stream"] is True
        assert req["messages"] == [{"role": "system", "content": "Answer about the weather."},
                                   {"role": "user", "content": "Weather?"}]
    finally:
        await chat_runner.cleanup()


async def test_an_unreachable_chat_server_fails_the_response_with_an_error_not_the_session():
    async with serve_local(local_responder="http://127.0.0.1:9/v1") as url:
        async with sdk(url).realtime.connect(model="m") as conn:
            await until(conn, "session.created")
            await conn.response.create()
            err = await until(conn, "error")
            assert "chat server unreachable" in err.error.message
            done = await until(conn, "response.done")
            assert done.response.status == "failed"
            await conn.session.update(session={"type": "realtime", "instructions": "still here"})
            await until(conn, "session.updated")


async def test_an_oversized_event_gets_an_error_and_the_session_stays_open(local_url):
    async with sdk(local_url).realtime.connect(model="m") as conn:
        await until(conn, "session.created")
        await conn._connection.send('{"type":"input_audio_buffer.append","audio":"' + "A" * (15 * 1024 * 1024) + '"}')
        assert (await until(conn, "error")).error.code == "message_too_large"
        await conn.session.update(session={"type": "realtime", "instructions": "ok"})
        await until(conn, "session.updated")


async def test_the_beta_handshake_is_refused_as_openai_does(local_url):
    from websockets.asyncio.client import connect

    ws_url = local_url.replace("http", "ws") + "/realtime"
    async with connect(ws_url, additional_headers={"OpenAI-Beta": "realtime=v1"}) as ws:
        import json as _json
        event = _json.loads(await ws.recv())
        assert event["error"]["code"] == "beta_api_shape_disabled"
        await ws.wait_closed()
        assert ws.close_code == 4000


async def test_server_vad_create_response_false_waits_and_speech_interrupts_an_active_response(utterance_pcm):
    # The answer streams for 12 s, so the user's speech lands while it is active: the
    # interruption is what is tested, not a race between TTS speed and the VAD.
    async with slow_chat_backend() as local_url, sdk(local_url).realtime.connect(model="m") as conn:
        await until(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": {
            "type": "server_vad", "create_response": False, "interrupt_response": True, "silence_duration_ms": 400}}}})
        await until(conn, "session.updated")
        seen: list = []
        await stream_realtime(conn, utterance_pcm, speed=2.0)
        await until(conn, "input_audio_buffer.committed", seen=seen)
        await asyncio.sleep(1.0)
        # create_response: false: the turn is committed, but nobody answers until asked
        await conn.send({"type": "conversation.item.retrieve", "item_id": "nope"})
        await until(conn, "error", seen=seen)
        assert not [e for e in seen if e.type == "response.created"]
        # a long answer, then the user speaks over it: the server cancels it (turn_detected)
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": LONG_TEXT}]})
        await conn.response.create()
        await until(conn, "response.output_audio.delta")
        sender = asyncio.ensure_future(stream_realtime(conn, utterance_pcm, speed=2.0))
        done = await until(conn, "response.done", timeout=20)
        await sender
        assert done.response.status == "cancelled"
        assert done.response.status_details.reason == "turn_detected"


@pytest.mark.parametrize("setting, value, says", [
    ("LOCAL_STT_MODEL", "/nonexistent/whisper-model", "LOCAL_STT_MODEL"),
    ("LOCAL_STT_MODEL", "harness", "not a faster-whisper model directory"),
    ("LOCAL_TTS_VOICE", "/nonexistent/voice.onnx", "LOCAL_TTS_VOICE"),
])
def test_a_model_that_cannot_load_stops_start_up_with_one_line_naming_the_setting(setting, value, says):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "REALTIME_URL")}
    env[setting] = value
    proc = subprocess.run([sys.executable, "server.py", "--port", "0", "--env-file", "/nonexistent"],
                          cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and says in errors[0] and setting in errors[0], proc.stderr


def test_voices_are_picked_by_name_and_unknown_names_get_the_default(tmp_path):
    from localrt.tts import Speaker, find_voices

    voices = find_voices("")
    assert [v.name for v in voices] == ["en_US-joe-medium.onnx"]
    speaker = Speaker(voices)
    assert speaker.pick("en_US-joe-medium") == speaker.pick("joe") == speaker.pick("alloy") == "en_US-joe-medium"


async def test_the_session_s_speed_makes_piper_speak_faster():
    from localrt.tts import Speaker, find_voices

    speaker = Speaker(find_voices(""), workers=1)
    await speaker.start()
    try:
        lengths = {}
        for speed in (1.0, 2.0):
            pcm = b"".join([c async for c in speaker.synthesize("Please remind me to call my sister tomorrow.", "joe", speed)])
            lengths[speed] = len(pcm) / 48000
        assert 1.5 < lengths[1.0] < 5.0
        # Piper's phoneme durations are drawn with noise (±15 % seen run to run): half the
        # length scale gives ≈0.5×, asserted with room for that noise
        assert lengths[2.0] < 0.8 * lengths[1.0], lengths
        heard = recognize(b"".join([c async for c in speaker.synthesize("Please remind me to call my sister tomorrow.")]),
                          24000).lower()
        assert "sister" in heard and "remind" in heard, heard
    finally:
        await speaker.close()


def _speech_end_ms(pcm24: bytes) -> int:
    """Where the voice ends: the end of the last 5 ms above -40 dBFS."""
    import numpy as np

    x = np.frombuffer(pcm24, dtype="<i2").astype(np.float64) / 32768.0
    n = x.size // 120
    level = 10 * np.log10((x[: n * 120].reshape(n, 120) ** 2).mean(axis=1) + 1e-12)
    return (int(np.nonzero(level > -40)[0][-1]) + 1) * 5


def _paused_sentence(folder, first: str, second: str, pause_s: float = 0.45) -> tuple[bytes, int]:
    """`first`, a pause of `pause_s` (from the end of its voice), `second`; and where the pause starts (ms)."""
    a, _ = read_pcm(speech_wav(first, folder / "a.wav", rate=24000, pad_s=0.0))
    b, _ = read_pcm(speech_wav(second, folder / "b.wav", rate=24000, pad_s=1.5))
    end_a = _speech_end_ms(a)
    a = a[: end_a * 48]
    b = b[int(0.45 * 24000) * 2:]  # most of the 0.5 s speech_wav puts in front
    return a + bytes(int((pause_s - 0.05) * 24000) * 2) + b, end_a


async def _turn_ends(conn, pcm: bytes, turn_detection: dict, speed: float = 1.0) -> list:
    await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": turn_detection}}})
    await until(conn, "session.updated")
    seen: list = []
    await stream_realtime(conn, pcm, speed=speed)
    await until(conn, "response.done", seen=seen)
    return [e for e in seen if e.type == "input_audio_buffer.speech_stopped"]


async def test_server_vad_ends_a_turn_its_silence_after_the_voice_ends_not_after_the_vad_lets_go(local_url, utterance_pcm):
    async with sdk(local_url).realtime.connect(model="m") as conn:
        await until(conn, "session.created")
        stops = await _turn_ends(conn, utterance_pcm, {"type": "server_vad", "silence_duration_ms": 500})
        assert len(stops) == 1
        silence = stops[0].audio_end_ms - _speech_end_ms(utterance_pcm)
        assert 500 <= silence < 500 + 32 + 40  # one VAD window; silero alone added 60-130 ms


async def test_semantic_vad_answers_a_finished_sentence_sooner_and_waits_through_a_pause_after_an_open_word(
        local_url, utterance_pcm, tmp_path):
    paused, pause_at = _paused_sentence(tmp_path, "I would like to book a table for", "two people tonight.")
    async with sdk(local_url).realtime.connect(model="m") as conn:
        await until(conn, "session.created")
        # streamed at half speed: the speculative decode's time counts half on the audio's timeline
        stops = await _turn_ends(conn, utterance_pcm, {"type": "semantic_vad", "eagerness": "auto"}, speed=0.5)
        assert len(stops) == 1
        assert stops[0].audio_end_ms - _speech_end_ms(utterance_pcm) < 450  # server VAD's default waits 500
        stops = await _turn_ends(conn, paused, {"type": "semantic_vad", "eagerness": "high"}, speed=0.5)
        assert len(stops) == 1, "the 450 ms pause after 'for' ended the turn"
        assert stops[0].audio_end_ms > pause_at + 450
