"""Does this machine's WebKitGTK have WebRTC? Prints one line.

Needs Debian's webkit2gtk-driver (WebKitWebDriver, MiniBrowser) and xvfb (MiniBrowser wants a
display): `apt-get install webkit2gtk-driver xvfb`. Starts WebKitWebDriver under xvfb-run,
opens a page on http://127.0.0.1 (a secure context) with WebRTC and media streams enabled in
WebKit's settings, and asks the page what it has.

    python3 scripts/probe_webkit.py
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

MINIBROWSER = "/usr/lib/x86_64-linux-gnu/webkit2gtk-4.1/MiniBrowser"
PROBE = ("return [navigator.userAgent, typeof RTCPeerConnection, typeof (navigator.mediaDevices || {}).getUserMedia]")


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>probe</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(port: int, method: str, path: str, body=None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.load(resp)


def main() -> int:
    for tool in ("WebKitWebDriver", "xvfb-run"):
        if not shutil.which(tool):
            print(f"webkit probe: {tool} is not installed (apt-get install webkit2gtk-driver xvfb)")
            return 2
    page = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=page.serve_forever, daemon=True).start()
    port = _free_port()
    driver = subprocess.Popen(["xvfb-run", "-a", "WebKitWebDriver", f"--port={port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(100):
            try:
                _call(port, "GET", "/status")
                break
            except OSError:
                time.sleep(0.1)
        args = ["--automation", "--enable-webrtc=true", "--enable-media-stream=true"]
        session = _call(port, "POST", "/session", {"capabilities": {"alwaysMatch": {
            "webkitgtk:browserOptions": {"binary": MINIBROWSER, "args": args}}}})["value"]
        sid, version = session["sessionId"], session["capabilities"].get("browserVersion")
        _call(port, "POST", f"/session/{sid}/url", {"url": f"http://127.0.0.1:{page.server_address[1]}/"})
        agent, peer, gum = _call(port, "POST", f"/session/{sid}/execute/sync", {"script": PROBE, "args": []})["value"]
        _call(port, "DELETE", f"/session/{sid}")
        print(f"WebKitGTK {version} (MiniBrowser {' '.join(args[1:])}): typeof RTCPeerConnection = {peer}, "
              f"getUserMedia = {gum}; {agent}")
        return 0 if peer == "function" else 1
    finally:
        import os
        import signal

        os.killpg(driver.pid, signal.SIGTERM)
        page.shutdown()


if __name__ == "__main__":
    sys.exit(main())
