"""Headless Firefox (Debian's firefox-esr) as a real caller, driven over WebDriver BiDi.

Why by hand: Playwright drives only its own patched Firefox (a download), Selenium needs
geckodriver (not packaged by Debian), and puppeteer would bring Node into a Python suite.
Firefox speaks WebDriver BiDi itself (`--remote-debugging-port`), a W3C JSON protocol over a
WebSocket; the few commands a test needs (navigate, evaluate, poll) fit in this file and
use the `websockets` client the project already depends on.

`FirefoxPage` answers the handful of Playwright `Page` calls the browser tests use
(`goto`, `click`, `evaluate`, `wait_for_function`, `on("console")`), so one test body runs
in either browser.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import websockets

FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox") or "/usr/bin/firefox-esr"

#: Preferences a person's Firefox does not have, and why each is here. Everything that
#: decides how WebRTC behaves (mDNS host obfuscation, no loopback candidates, no RED) is
#: left at Firefox's defaults: the server must cope with Firefox as people run it.
TEST_PREFS = {
    "media.navigator.streams.fake": True,  # a synthetic microphone (a tone), no sound card
    "media.navigator.permission.disabled": True,  # nobody to click "Allow"
    "media.autoplay.default": 0,  # the page's <audio> plays without a click
    "media.autoplay.blocking_policy": 0,
    # A plain-http page on a namespace address (the loss tests) may use the microphone, as
    # Chromium's --unsafely-treat-insecure-origin-as-secure allows there.
    "media.devices.insecure.enabled": True,
    "media.getusermedia.insecure.enabled": True,
    "browser.shell.checkDefaultBrowser": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.disabledForTesting": True,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
}


def available() -> Optional[str]:
    """None when Firefox can be driven here, else why not."""
    return None if os.path.exists(FIREFOX) else "needs Debian's firefox-esr (./test.sh installs it)"


#: A relay (run inside a network namespace): Unix socket path → 127.0.0.1:port there.
_RELAY = """
import asyncio, sys
async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()
async def handle(reader, writer):
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", int(sys.argv[2]))
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
async def main():
    server = await asyncio.start_unix_server(handle, sys.argv[1])
    print("listening", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


class BiDiError(RuntimeError):
    pass


class Firefox:
    """One headless Firefox process and its BiDi session."""

    def __init__(self, *, prefs: Optional[dict] = None, env: Optional[dict] = None, link=None):
        """`link`: a `harness.netns.LossyLink` to run inside (its namespace's network)."""
        self._prefs = {**TEST_PREFS, **(prefs or {})}
        self._env = env or {}
        self._link = link
        self._relay: Optional[subprocess.Popen] = None
        self._proc: Optional[subprocess.Popen] = None
        self._profile: Optional[tempfile.TemporaryDirectory] = None
        self._ws = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._listeners: list[Callable[[dict], None]] = []
        self._reader: Optional[asyncio.Task] = None
        self.log: list[str] = []  # Firefox's own stderr lines

    async def start(self, timeout_s: float = 30.0) -> "Firefox":
        self._profile = tempfile.TemporaryDirectory(prefix="rt-firefox-")
        profile = Path(self._profile.name)
        (profile / "user.js").write_text(
            "".join(f'user_pref("{k}", {json.dumps(v)});\n' for k, v in self._prefs.items()))
        argv = [FIREFOX, "--headless", "--no-remote", "--profile", str(profile), "--remote-debugging-port", "0"]
        if self._link is not None:
            argv = ["ip", "netns", "exec", self._link.ns, *argv]
        env = {**os.environ, "MOZ_CRASHREPORTER_DISABLE": "1", **self._env}
        self._proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                                      start_new_session=True)
        loop = asyncio.get_running_loop()
        url = await asyncio.wait_for(loop.run_in_executor(None, self._bidi_url), timeout_s)
        if self._link is None:
            self._ws = await websockets.connect(url + "/session", max_size=None, ping_interval=None)
        else:
            # The URL keeps Firefox's loopback Host header; the bytes go through the relay.
            path = await loop.run_in_executor(None, self._relay_into_namespace, url)
            self._ws = await websockets.unix_connect(path, url + "/session", max_size=None, ping_interval=None)
        self._reader = asyncio.create_task(self._read())
        await self.send("session.new", {"capabilities": {"alwaysMatch": {"acceptInsecureCerts": True}}})
        return self

    def _bidi_url(self) -> str:
        assert self._proc is not None and self._proc.stderr is not None
        for raw in self._proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            found = re.search(r"WebDriver BiDi listening on (ws://\S+)", line)
            if found:
                # Keep draining stderr so Firefox never blocks on a full pipe.
                _drain_in_background(self._proc.stderr, self.log)
                return found.group(1)
        raise BiDiError("Firefox exited before offering WebDriver BiDi: " + " | ".join(self.log[-10:]))

    def _relay_into_namespace(self, url: str) -> str:
        """Firefox's BiDi listens on the namespace's own loopback: a relay inside the namespace
        exposes it on a Unix socket, which no namespace, address change or loss rule touches."""
        port = int(url.rsplit(":", 1)[1])
        path = os.path.join(self._profile.name, "bidi.sock")
        self._relay = subprocess.Popen(["ip", "netns", "exec", self._link.ns, sys.executable, "-c", _RELAY,
                                        path, str(port)], stdout=subprocess.PIPE, text=True)
        if not self._relay.stdout.readline().startswith("listening"):
            raise BiDiError("the BiDi relay into the namespace did not start")
        return path

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                msg = json.loads(raw)
                if "id" in msg and msg["id"] in self._pending:
                    fut = self._pending.pop(msg["id"])
                    if not fut.done():
                        if msg.get("type") == "error":
                            fut.set_exception(BiDiError(f"{msg.get('error')}: {msg.get('message')}"))
                        else:
                            fut.set_result(msg.get("result", {}))
                elif msg.get("type") == "event":
                    for listener in list(self._listeners):
                        listener(msg)
        except websockets.ConnectionClosed:
            pass
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(BiDiError("Firefox closed the BiDi session"))

    async def send(self, method: str, params: dict, timeout_s: float = 60.0) -> dict:
        msg_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        return await asyncio.wait_for(fut, timeout_s)

    async def new_page(self) -> "FirefoxPage":
        made = await self.send("browsingContext.create", {"type": "tab"})
        return FirefoxPage(self, made["context"])

    async def close(self) -> None:
        if self._ws is not None:
            try:
                await asyncio.wait_for(self.send("browser.close", {}), 5)
            except Exception:
                pass
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
        if self._proc is not None:
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._proc.wait, 10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
        if self._relay is not None:
            self._relay.terminate()
            self._relay.wait(timeout=5)
        if self._profile is not None:
            self._profile.cleanup()

    async def __aenter__(self) -> "Firefox":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _drain_in_background(stream, sink: list[str]) -> None:
    """Read a pipe to its end on a thread, keeping its last 500 lines in `sink`."""
    def drain() -> None:
        for raw in stream:
            sink.append(raw.decode(errors="replace").rstrip())
            del sink[:-500]

    threading.Thread(target=drain, daemon=True).start()


class FirefoxPage:
    """One tab, with the Playwright `Page` calls the browser tests use."""

    def __init__(self, browser: Firefox, context: str):
        self._browser = browser
        self.context = context
        self._console: list[Callable] = []

    async def add_init_script(self, js: str) -> None:
        """Run `js` in every document this tab loads, before the page's own scripts
        (Playwright's `add_init_script`)."""
        await self._browser.send("script.addPreloadScript", {
            "functionDeclaration": f"() => {{ {js} }}", "contexts": [self.context]})

    async def goto(self, url: str) -> None:
        await self._browser.send("browsingContext.navigate", {"context": self.context, "url": url, "wait": "complete"})

    async def evaluate(self, js: str) -> Any:
        """Playwright semantics: `js` is an expression or a function (called with no
        arguments); promises are awaited; the value comes back through JSON."""
        expression = ("(async () => { const v = (" + js.strip() + "); "
                      "const r = typeof v === 'function' ? await v() : await v; "
                      "return r === undefined ? undefined : JSON.stringify(r); })()")
        out = await self._browser.send("script.evaluate", {
            "expression": expression, "target": {"context": self.context}, "awaitPromise": True,
            "resultOwnership": "none"})
        if out.get("type") == "exception":
            details = out.get("exceptionDetails", {})
            raise BiDiError(f"page threw: {details.get('text')}")
        value = out.get("result", {})
        if value.get("type") != "string":
            return None  # undefined
        return json.loads(value["value"])

    async def click(self, selector: str) -> None:
        clicked = await self.evaluate(
            f"() => {{ const el = document.querySelector({json.dumps(selector)}); if (!el) return false; "
            f"el.click(); return true; }}")
        if not clicked:
            raise BiDiError(f"nothing matches {selector}")

    async def wait_for_function(self, js: str, timeout: float = 30000, poll_s: float = 0.05) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout / 1000
        while True:
            value = await self.evaluate(js)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} ms waiting for {js}")
            await asyncio.sleep(poll_s)

    def on(self, event: str, handler: Callable) -> None:
        if event != "console":
            raise ValueError(event)
        self._console.append(handler)

        def listener(msg: dict) -> None:
            if msg.get("method") == "log.entryAdded":
                entry = msg["params"]
                if entry.get("source", {}).get("context") == self.context:
                    text = entry.get("text", "")
                    for h in self._console:
                        h(_Text(text))

        if len(self._console) == 1:
            self._browser._listeners.append(listener)
            asyncio.ensure_future(self._browser.send("session.subscribe", {"events": ["log.entryAdded"],
                                                                          "contexts": [self.context]}))

    async def close(self) -> None:
        await self._browser.send("browsingContext.close", {"context": self.context})


class _Text:
    def __init__(self, text: str):
        self.text = text
