"""Browser end-to-end, in Chromium and in Firefox (Debian's, headless, each with a
spoken WAV as its microphone and Firefox's WebRTC settings left as people have them): the
real page talks through the real bridge to a Realtime stub or the local backend, hears
and shows the reply."""

from __future__ import annotations

import asyncio

import pytest

from harness.browser import BROWSERS, caption_js, open_browser, settle_playout, start_call, unavailable, until
from harness.stub import RealtimeStub
from media.audio import rms_dbfs
from harness.speech import speech_wav


@pytest.fixture(params=BROWSERS)
async def browser(request, tmp_path):
    why_not = unavailable(request.param)
    if why_not:
        pytest.skip(why_not)
    mic = speech_wav("Hello there. What is the weather like today?", tmp_path / "mic.wav", pad_s=3.0)
    async with open_browser(request.param, mic) as b:
        yield b


async def run_page_call(browser, url: str, *, expect_user: str, expect_model: str, timeout: float = 40.0):
    page = await browser.new_page()
    logs: list[str] = []
    page.on("console", lambda m: logs.append(m.text))
    await page.goto(url)
    await page.click("#call")
    await until(page, "window.bridge.state === 'connected'", 30)
    await until(page, caption_js("user", expect_user), timeout)
    await until(page, caption_js("assistant", expect_model), timeout)
    await until(page, "window.bridge.modelPeak > 0.05", 15)
    return page, logs


async def test_the_page_talks_to_the_model_and_plays_and_captions_the_reply(browser, start_bridge, tmp_path):
    async with RealtimeStub(auto=True, reply_freq=440, reply_ms=1500, reply_text="I hear you loud and clear.",
                            user_text="hello there what is the weather") as stub:
        bridge = await start_bridge(stub.url)
        page, logs = await run_page_call(browser, bridge.url, expect_user="hello there", expect_model="loud and clear")
        session = stub.session
        # The caller's speech arrived upstream as 24 kHz PCM at a speech-like level.
        levels = [rms_dbfs(bytes(session.audio[i:i + 4800])) for i in range(0, len(session.audio), 4800)]
        assert max(levels) > -35, max(levels)
        # The page measured the model's reply in its <audio> path.
        peak = await page.evaluate("window.bridge.modelPeak")
        assert peak > 0.05
        # Hanging up from the page ends the call on the server.
        await page.click("#call")
        await page.wait_for_function("window.bridge.state === 'idle'")
        await bridge.wait_no_calls()


@pytest.fixture
async def server_without_key():
    """`python server.py` exactly as a user runs it, with no API key and no URL: the local backend."""
    import os
    import socket
    import subprocess
    import sys

    import aiohttp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "REALTIME_API_KEY", "REALTIME_URL")}
    proc = subprocess.Popen([sys.executable, "server.py", "--port", str(port), "--env-file", "/nonexistent"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(url + "/healthz") as r:
                        if r.status == 200 and (await r.json())["upstream"] == "local":
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("server.py did not become healthy")
        yield url
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0, output
        assert "Traceback" not in output, output


async def test_with_no_key_the_page_has_a_spoken_conversation_with_the_local_backend(browser, server_without_key):
    page, _ = await run_page_call(browser, server_without_key, expect_user="weather", expect_model="You said", timeout=60)
    await until(page, caption_js("assistant", "weather"), 30)  # the model heard the words
    await page.click("#call")
    await page.wait_for_function("window.bridge.state === 'idle'")


async def test_the_page_shows_the_server_s_reason_when_a_call_is_refused(browser, start_bridge):
    bridge = await start_bridge("ws://127.0.0.1:9/v1/realtime")  # nothing listens there
    page = await browser.new_page()
    await page.goto(bridge.url)
    await page.click("#call")
    await page.wait_for_function("window.bridge.state === 'failed'", timeout=15000)
    error = await page.evaluate("() => { const e = document.getElementById('error'); "
                                "return {hidden: e.hidden, text: e.innerText}; }")
    assert not error["hidden"]
    assert "502" in error["text"] and "could not reach upstream" in error["text"]
    assert await page.evaluate("document.getElementById('call').innerText") == "Start"  # ready to try again
    assert await page.evaluate("window.bridge.pc === null")


async def test_on_a_server_with_an_auth_token_a_link_with_a_key_connects_and_one_without_is_told_why(browser, start_bridge):
    import aiohttp

    async with RealtimeStub(auto=True, reply_text="Authorised and talking.", user_text="hello there") as stub:
        bridge = await start_bridge(stub.url, auth_token="operator-token")
        page = await browser.new_page()
        await page.goto(bridge.url)
        await page.click("#call")
        await page.wait_for_function("window.bridge.state === 'failed'", timeout=15000)
        assert "401" in await page.evaluate("document.getElementById('error').innerText")
        async with aiohttp.ClientSession() as http:
            async with http.post(bridge.url + "/v1/realtime/client_secrets", json={},
                                 headers={"Authorization": "Bearer operator-token"}) as r:
                key = (await r.json())["value"]
        await page.close()
        await run_page_call(browser, f"{bridge.url}/#key={key}", expect_user="hello there", expect_model="Authorised")


async def test_the_page_shows_a_server_run_tool_call_and_its_result(browser, start_bridge, tmp_path):
    from aiohttp import web

    async def lookup(request: web.Request) -> web.Response:
        return web.json_response({"status": "shipped", "number": (await request.json())["number"]})

    from harness.web import serve_app, tools_toml

    service = web.Application()
    service.router.add_post("/lookup", lookup)
    runner, url = await serve_app(service)
    tools = tmp_path / "tools.toml"
    tools.write_text(tools_toml(url, secret_var="HOME"))  # any variable that is set
    try:
        async with RealtimeStub() as stub:
            bridge = await start_bridge(stub.url, tools_config=str(tools))
            page = await browser.new_page()
            await page.goto(bridge.url)
            await page.click("#call")
            await page.wait_for_function("window.bridge.state === 'connected'", timeout=30000)
            session = await stub.wait_session()
            await stub.call_function("lookup_order", '{"number": "A-7"}', session)
            await until(page, "() => [...document.querySelectorAll('.caption.tool')]"
                              ".some((e) => e.innerText.includes('shipped'))", 10)
            text = await page.evaluate("() => [...document.querySelectorAll('.caption.tool')]"
                                       ".map((e) => e.innerText).join('\\n')")
            assert 'lookup_order({"number": "A-7"})' in text and '"status": "shipped"' in text
            assert "127.0.0.1" not in text  # the endpoint stays on the server
    finally:
        await runner.cleanup()


async def test_speaking_over_the_model_cuts_it_off_where_the_page_heard_it(browser, start_bridge):
    """The model's 6 s answer is playing in the page when upstream's VAD hears the caller
    (`speech_started`, as OpenAI sends it): the bridge stops the model's audio, the page falls
    silent as soon as what its buffers held has played, and the item is truncated at what the
    page had been sent.
    The answer starts once the browser's playout has settled (Firefox here starts with a
    backlog of seconds, see `settle_playout`)."""
    async with RealtimeStub() as stub:
        bridge = await start_bridge(stub.url)
        page = await start_call(browser, bridge.url, timeout_s=30)
        session = await stub.wait_session()
        await settle_playout(page)
        answer = asyncio.ensure_future(stub.respond(session, freq=440, ms=6000, text="A long answer to interrupt."))
        await until(page, "window.bridge.modelPeak > 0.05", 20)  # the answer plays
        await asyncio.sleep(1.0)
        await stub.speech_started(session)
        for _ in range(100):
            if session.truncations:
                break
            await asyncio.sleep(0.05)
        assert session.truncations, "the bridge never truncated the interrupted answer"
        truncate = session.truncations[0]
        assert 1000 <= truncate["audio_end_ms"] < 6000, truncate  # cut inside the answer, not after it
        call = next(iter(bridge.registry.calls.values()))
        assert call.record.data["barge_ins"], call.record.data
        # What was already inside the browser's buffers plays out (0.5 s in Firefox here, 1.3 s on
        # a loaded machine); then the page stays silent: the rest of the answer, 4 s and more,
        # never reached it.
        await until(page, "window.bridge.modelLevel < 0.01", 2.5)
        levels = []
        for _ in range(10):
            levels.append(await page.evaluate("window.bridge.modelLevel"))
            await asyncio.sleep(0.1)
        assert max(levels) < 0.01, levels
        await answer


async def test_sound_that_stops_by_itself_comes_back(browser, start_bridge):
    """What Safari does on a phone call or Siri (the page's AudioContext suspended), what a route
    change does to the <audio> element (paused): the page brings the sound back by itself, and
    the model is heard again."""
    async with RealtimeStub() as stub:
        bridge = await start_bridge(stub.url)
        page = await start_call(browser, bridge.url, timeout_s=30)
        session = await stub.wait_session()
        await page.evaluate("window.bridge.audioCtx.suspend()")
        await until(page, "window.bridge.audioCtx.state === 'running'", 5)
        await page.evaluate("document.getElementById('remote').pause()")
        await until(page, "!document.getElementById('remote').paused", 5)
        assert await page.evaluate("!document.querySelector('.resume') || document.querySelector('.resume').hidden")
        await page.evaluate("window.bridge.modelPeak = 0")
        await stub.respond(session, freq=440, ms=1500)
        await until(page, "window.bridge.modelPeak > 0.05", 15)
