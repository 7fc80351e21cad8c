"""The floor: a bare aiortc echo peer. No upstream, no policy, nothing of ours — the
caller's audio track is sent straight back. Speaks the same offer/answer route
(`POST /v1/realtime/calls`, application/sdp) so the same clients measure it.

    python bench/baseline_echo.py --port 8090
"""

from __future__ import annotations

import argparse
import uuid

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

pcs: dict[str, RTCPeerConnection] = {}


async def offer(request: web.Request) -> web.Response:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    call_id = uuid.uuid4().hex
    pcs[call_id] = pc

    @pc.on("track")
    def on_track(track):
        pc.addTrack(track)  # echo

    @pc.on("connectionstatechange")
    async def on_state():
        if pc.connectionState in ("failed", "closed"):
            pcs.pop(call_id, None)
            await pc.close()

    await pc.setRemoteDescription(RTCSessionDescription(sdp=await request.text(), type="offer"))
    await pc.setLocalDescription(await pc.createAnswer())
    return web.Response(status=201, text=pc.localDescription.sdp, content_type="application/sdp",
                        headers={"Location": f"/v1/realtime/calls/{call_id}"})


async def hangup(request: web.Request) -> web.Response:
    pc = pcs.pop(request.match_info["call_id"], None)
    if pc:
        await pc.close()
    return web.json_response({"status": "ended"})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "active_calls": len(pcs)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8090)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()
    app = web.Application()
    app.router.add_post("/v1/realtime/calls", offer)
    app.router.add_post("/v1/realtime/calls/{call_id}/hangup", hangup)
    app.router.add_get("/healthz", health)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
