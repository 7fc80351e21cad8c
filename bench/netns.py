"""Section 6: the WebSocket-relay design against our RTP path, under the same loss.

A network namespace `rtbench` holds the caller (bench/netns_client.py); a veth
pair links it to this machine's namespace (10.203.0.1 ↔ 10.203.0.2), where the
bridge, a minimal PCM-over-WebSocket relay and the instant upstream run. After
each call has connected, nftables inside the namespace drops a random share of
the caller's TCP and UDP packets in both directions (`numgen random mod 100 <
L drop`). Both paths end at the same upstream, which timestamps marker arrival;
processes on one machine share the monotonic clock.

If this machine refuses (not root, no namespaces, no nftables), the result says
so instead of inventing figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from aiohttp import WSMsgType, web
from websockets.asyncio.client import connect

from bench.common import ONE_ADDRESS, ROOT, free_port, pcts
from bench.markers import pair
from bench.upstream import InstantUpstream
from realtime import events

NS = "rtbench"
HOST_IF, NS_IF = "rtb0", "rtb1"
HOST_IP, NS_IP = "10.203.0.1", "10.203.0.2"


def _sh(*cmd: str, ns: bool = False) -> None:
    full = ["ip", "netns", "exec", NS, *cmd] if ns else list(cmd)
    subprocess.run(full, check=True, capture_output=True, text=True)


def setup_namespace() -> None:
    teardown_namespace()
    _sh("ip", "netns", "add", NS)
    _sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
    _sh("ip", "link", "set", NS_IF, "netns", NS)
    _sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_IF)
    _sh("ip", "link", "set", HOST_IF, "up")
    _sh("ip", "addr", "add", f"{NS_IP}/24", "dev", NS_IF, ns=True)
    _sh("ip", "link", "set", NS_IF, "up", ns=True)
    _sh("ip", "link", "set", "lo", "up", ns=True)
    _sh("nft", "add", "table", "inet", "rtbench", ns=True)
    for hook in ("input", "output"):
        _sh("nft", "add", "chain", "inet", "rtbench", hook, f"{{ type filter hook {hook} priority 0 ; }}", ns=True)


def set_loss(pct: int) -> None:
    for hook in ("input", "output"):
        _sh("nft", "flush", "chain", "inet", "rtbench", hook, ns=True)
        if pct > 0:
            _sh("nft", "add", "rule", "inet", "rtbench", hook, "meta", "l4proto", "{", "tcp", ",", "udp", "}",
                "numgen", "random", "mod", "100", "<", str(pct), "drop", ns=True)


def teardown_namespace() -> None:
    subprocess.run(["ip", "link", "del", HOST_IF], capture_output=True)
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)


class PcmRelay:
    """The design we replace: the page streams PCM16 over a WebSocket; the relay forwards
    each frame upstream as `input_audio_buffer.append`."""

    def __init__(self, upstream_url: str) -> None:
        self.upstream_url = upstream_url
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async with connect(self.upstream_url, compression=None) as up:
            drain = asyncio.ensure_future(_drain(up))
            try:
                async for msg in ws:
                    if msg.type == WSMsgType.BINARY:
                        await up.send(events.dumps(events.input_audio_append(msg.data)))
            finally:
                drain.cancel()
        return ws

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/relay", self._ws)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, HOST_IP, port).start()
        self.url = f"ws://{HOST_IP}:{port}/relay"

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()


async def _drain(ws) -> None:
    async for _ in ws:
        pass


async def one_run(path: str, url: str, loss: int, seconds: float, up: InstantUpstream) -> dict:
    before = len(up.sessions)
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", NS, sys.executable, "bench/netns_client.py", "--mode", path, "--url", url,
        "--seconds", str(seconds), cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if line.strip() != b"READY":
            raise RuntimeError(f"{path} client did not connect: {line!r}")
        set_loss(loss)
        proc.stdin.write(b"GO\n")
        await proc.stdin.drain()
        out = await asyncio.wait_for(proc.stdout.readline(), seconds + 60)
        sent = json.loads(out)["sent"]
    finally:
        set_loss(0)
        if proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except asyncio.TimeoutError:
                proc.kill()
    await asyncio.sleep(0.5)
    session = up.sessions[before]
    lat, lost = pair([tuple(x) for x in sent], session.detector.onsets)
    start, end = (sent[0][0], sent[-1][0]) if sent else (0, 0)
    arrivals = np.array([t for t in session.arrivals if start <= t <= end + 1])
    stalls = int((np.diff(arrivals) >= 0.2).sum()) if arrivals.size > 1 else 0
    return {"loss_pct": loss, "path": path, "latency_ms": pcts(lat), "lost": lost, "markers": len(sent),
            "stalls_per_min": round(stalls / (seconds / 60), 1)}


async def relay_vs_rtp(levels=(0, 2, 5, 10), seconds: float = 30) -> dict:
    if os.geteuid() != 0:
        return {"refused": "this section needs root (network namespaces and nftables); not run"}
    for tool in ("ip", "nft"):
        if not shutil.which(tool):
            return {"refused": f"'{tool}' is not installed (scripts/setup.sh --dev installs it); not run"}
    try:
        setup_namespace()
    except subprocess.CalledProcessError as exc:
        teardown_namespace()
        return {"refused": f"the machine refused the namespace set-up: {' '.join(exc.cmd)}: {exc.stderr.strip()}"}
    from bench.run import Server  # the bridge process, as in the other sections

    up = await InstantUpstream("quiet").start()
    relay = PcmRelay(up.url)
    await relay.start()
    bridge = Server(["server.py", *ONE_ADDRESS, "--host", HOST_IP, "--realtime-url", up.url, "--log-level", "WARNING",
                     "--env-file", "/nonexistent", "--media-timeout", "60"], "bridge_netns", host=HOST_IP)
    rows = []
    try:
        for loss in levels:
            for path, url in (("websocket", relay.url), ("rtp", bridge.url)):
                row = await one_run(path, url, loss, seconds, up)
                rows.append(row)
                print(f"  {path:9} loss {loss:2d}%: latency {row['latency_ms']}, stalls/min {row['stalls_per_min']}, "
                      f"lost {row['lost']}/{row['markers']}", flush=True)
    finally:
        bridge.stop()
        await relay.stop()
        await up.stop()
        teardown_namespace()
    return {"setup": (f"Caller in network namespace {NS} ({NS_IP}) ↔ veth ↔ servers at {HOST_IP}; nftables random drop "
                      f"of the caller's TCP and UDP packets both ways, switched on after the call connected; "
                      f"{seconds:g} s per run. WebSocket path: 20 ms PCM16 frames → relay → upstream. RTP path: "
                      "Opus → this bridge → upstream. Latency: marker sent → arrived upstream."),
            "rows": rows}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(relay_vs_rtp(levels=(0, 5), seconds=8)), indent=1))
