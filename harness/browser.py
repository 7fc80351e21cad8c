"""Real browsers as callers: headless Chromium (Debian's) driven by Playwright with
`executable_path` (never `playwright install`), a WAV file as its microphone; headless
Firefox (Debian's firefox-esr) driven over WebDriver BiDi (`harness.firefox`), the same
WAV played into a private PulseAudio microphone. `open_browser(name, …)` gives either one,
and the pages they open answer the same calls (`goto`, `click`, `evaluate`,
`wait_for_function`, `close`), so one test body runs in both."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Optional

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def chromium_args(mic_wav: Path, *, secure_origin: Optional[str] = None) -> list[str]:
    """Flags that work on these machines; `secure_origin` lets a plain-http page on a
    non-localhost address use the microphone."""
    args = ["--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic_wav}", "--autoplay-policy=no-user-gesture-required",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-gpu", "--no-first-run", "--disable-quic"]
    if secure_origin:
        args.append(f"--unsafely-treat-insecure-origin-as-secure={secure_origin}")
    return args


#: The page's RTCPeerConnection stats that say what loss did to the audio, both ways.
AUDIO_STATS_JS = """async () => {
  const out = {};
  const stats = await window.bridge.pc.getStats();
  stats.forEach((s) => {
    if (s.kind !== 'audio' && s.type !== 'codec') return;
    if (s.type === 'inbound-rtp' || s.type === 'outbound-rtp' || s.type === 'remote-inbound-rtp') out[s.type] = s;
    if (s.type === 'codec') (out.codecs = out.codecs || []).push(s);
  });
  out.answer = window.bridge.pc.remoteDescription ? window.bridge.pc.remoteDescription.sdp : '';
  return out;
}"""


async def launch(playwright, mic_wav: Path, *, link=None, origin: Optional[str] = None):
    """Chromium with `mic_wav` as its microphone; inside `link`'s namespace if given."""
    executable = link.wrap(CHROMIUM) if link is not None else CHROMIUM
    return await playwright.chromium.launch(executable_path=executable, headless=True,
                                            args=chromium_args(mic_wav, secure_origin=origin))


#: The browsers the browser tests run in.
BROWSERS = ("chromium", "firefox")


def unavailable(name: str) -> Optional[str]:
    """None when browser `name` can be driven on this machine, else why not."""
    if name == "chromium":
        return None if shutil.which("chromium") else "needs Debian's chromium (./test.sh installs it)"
    from harness import firefox, pulse
    return firefox.available() or pulse.available()


@asynccontextmanager
async def open_browser(name: str, mic_wav: Path, *, link=None, origin: Optional[str] = None,
                       pulse=None) -> AsyncIterator:
    """Browser `name` with `mic_wav` as its microphone (from when a page opens it, looped),
    inside `link`'s namespace if given. For Firefox, `pulse` may be a started
    `harness.pulse.PulseAudio` to use (to loop its speaker back into its microphone)."""
    if name == "chromium":
        from playwright.async_api import async_playwright

        async with async_playwright() as p:
            browser = await launch(p, mic_wav, link=link, origin=origin)
            try:
                yield browser
            finally:
                await browser.close()
        return
    from harness.firefox import Firefox
    from harness.pulse import PulseAudio

    own = pulse is None
    pulse = pulse or PulseAudio().start()
    try:
        pulse.loop(mic_wav)
        firefox = Firefox(prefs={"media.navigator.streams.fake": False}, env=pulse.env, link=link)
        await firefox.start()
        try:
            yield firefox
        finally:
            await firefox.close()
    finally:
        if own:
            pulse.stop()


#: What a failed wait reports about the page.
PAGE_STATE_JS = """() => ({state: window.bridge.state, reconnects: window.bridge.reconnects,
  pc: window.bridge.pc && window.bridge.pc.connectionState, error: document.getElementById('error').innerText,
  captions: [...document.querySelectorAll('.caption')].map((e) => e.innerText)})"""


async def until(page, js: str, timeout_s: float) -> None:
    """Wait for the page expression `js`; if it never comes, fail saying where the page is."""
    try:
        await page.wait_for_function(js, timeout=timeout_s * 1000)
    except Exception:
        seen = await page.evaluate(PAGE_STATE_JS)
        raise AssertionError(f"page never got to {js}: {json.dumps(seen)}") from None


def caption_js(role: str, text: str) -> str:
    """A page expression: a finished caption of `role` contains `text` (case-insensitive)."""
    return (f"() => [...document.querySelectorAll('.caption.{role}:not(.partial)')]"
            f".some((e) => e.innerText.toLowerCase().includes({json.dumps(text.lower())}))")


CAPTIONS_JS = "() => [...document.querySelectorAll('.caption')].map((e) => [e.dataset.role, e.innerText])"


JITTER_JS = """async () => { let o = null; (await window.bridge.pc.getStats()).forEach((s) => {
  if (s.type === 'inbound-rtp' && s.kind === 'audio') o = [s.jitterBufferDelay || 0, s.jitterBufferEmittedCount || 0]; });
  return o; }"""


def jitter_ms(before: list, after: list) -> Optional[float]:
    """What the browser's jitter buffer held, on average, for each sample it played between
    two `JITTER_JS` readings (None if it played nothing)."""
    emitted = after[1] - before[1]
    return (after[0] - before[0]) / emitted * 1000 if emitted > 0 else None


async def settle_playout(page, below_ms: float = 150.0, timeout_s: float = 30.0) -> float:
    """Wait until the browser's jitter buffer holds less than `below_ms` (over the last 0.5 s);
    returns how long that took. Firefox here starts pulling audio from its jitter buffer
    ≈2 s after the call connects and then takes ≈12 s to shrink the backlog (Chromium: at once)."""
    start = time.monotonic()
    prev = await page.evaluate(JITTER_JS) or [0, 0]
    while time.monotonic() - start < timeout_s:
        await asyncio.sleep(0.5)
        now = await page.evaluate(JITTER_JS) or [0, 0]
        held = jitter_ms(prev, now)
        if held is not None and held < below_ms:
            return time.monotonic() - start
        prev = now
    raise AssertionError(f"the browser's jitter buffer stayed over {below_ms} ms for {timeout_s} s")


async def start_call(browser, url: str, timeout_s: float = 15.0):
    """Open the bundled page at `url`, press Start, wait until the call is connected."""
    page = await browser.new_page()
    await page.goto(url)
    await page.click("#call")
    await page.wait_for_function("window.bridge.state === 'connected'", timeout=timeout_s * 1000)
    return page


async def audio_stats(page) -> dict:
    return await page.evaluate(AUDIO_STATS_JS)


def answer_audio_lines(sdp: str) -> list[str]:
    """The answer's audio m-line and its rtpmap/fmtp lines."""
    out, in_audio = [], False
    for line in sdp.splitlines():
        if line.startswith("m="):
            in_audio = line.startswith("m=audio")
        if in_audio and line.startswith(("m=audio", "a=rtpmap", "a=fmtp")):
            out.append(line)
    return out
