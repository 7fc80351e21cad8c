"""Browser end-to-end: headless Chromium (Debian) with a fake microphone file loads the
real page, talks through the real bridge to a Realtime stub, hears and shows the reply."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from harness.browser import CHROMIUM, chromium_args
from harness.stub import RealtimeStub
from media.audio import rms_dbfs
from harness.speech import speech_wav

pytestmark = pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (./test.sh installs it)")


@pytest.fixture
async def browser(tmp_path):
    from playwright.async_api import async_playwright

    mic = speech_wav("Hello there. What is the weather like today?", tmp_path / "mic.wav", pad_s=3.0)
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=chromium_args(mic), headless=True)
        yield b
        await b.close()


async def run_page_call(browser, url: str, *, expect_user: str, expect_model: str, timeout: float = 40.0):
    page = await browser.new_page()
    logs: list[str] = []
    page.on("console", lambda m: logs.append(m.text))
    await page.goto(url)
    await page.click("#call")
    await page.wait_for_function("window.bridge.state === 'connected'", timeout=30000)
    user = page.locator(".caption.user:not(.partial)", has_text=expect_user)
    model = page.locator(".caption.assistant:not(.partial)", has_text=expect_model)
    await user.first.wait_for(timeout=timeout * 1000)
    await model.first.wait_for(timeout=timeout * 1000)
    await page.wait_for_function("window.bridge.modelPeak > 0.05", timeout=15000)
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
    assert "weather" in (await page.locator(".caption.assistant").first.inner_text()).lower()
    await page.click("#call")
    await page.wait_for_function("window.bridge.state === 'idle'")


async def test_the_page_shows_the_server_s_reason_when_a_call_is_refused(browser, start_bridge):
    bridge = await start_bridge("ws://127.0.0.1:9/v1/realtime")  # nothing listens there
    page = await browser.new_page()
    await page.goto(bridge.url)
    await page.click("#call")
    await page.wait_for_function("window.bridge.state === 'failed'", timeout=15000)
    error = page.locator("#error")
    assert await error.is_visible()
    text = await error.inner_text()
    assert "502" in text and "could not reach upstream" in text
    assert await page.locator("#call").inner_text() == "Start"  # ready to try again
    assert await page.evaluate("window.bridge.pc") is None


async def test_on_a_server_with_an_auth_token_a_link_with_a_key_connects_and_one_without_is_told_why(browser, start_bridge):
    import aiohttp

    async with RealtimeStub(auto=True, reply_text="Authorised and talking.", user_text="hello there") as stub:
        bridge = await start_bridge(stub.url, auth_token="operator-token")
        page = await browser.new_page()
        await page.goto(bridge.url)
        await page.click("#call")
        await page.wait_for_function("window.bridge.state === 'failed'", timeout=15000)
        assert "401" in await page.locator("#error").inner_text()
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
            shown = page.locator(".caption.tool", has_text="shipped")
            await shown.first.wait_for(timeout=10000)
            text = await shown.first.inner_text()
            assert 'lookup_order({"number": "A-7"})' in text and '"status": "shipped"' in text
            assert "127.0.0.1" not in text  # the endpoint stays on the server
    finally:
        await runner.cleanup()
