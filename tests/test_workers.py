"""`server.py --workers 2`: two processes share the port; calls and hangups work whichever
process the kernel hands a request to."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import websockets

from harness.caller import Caller
from tests.conftest import eventually

ROOT = Path(__file__).resolve().parent.parent


async def test_two_workers_share_the_port_and_any_worker_hangs_up_any_call(stub, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "REALTIME_URL")}
    proc = subprocess.Popen([sys.executable, "server.py", "--workers", "2", "--port", str(port), "--max-calls", "60",
                             "--realtime-url", stub.url, "--env-file", "/nonexistent", "--operator-on-loopback", "true",
                             "--records-db", str(tmp_path / "records.db"), "--admission", "false"],  # forwarding, not load, is tested
                            cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    callers = []
    try:
        workers_seen = set()
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(url + "/healthz") as r:
                        health = await r.json()
                        assert health["workers"] == 2 and health["max_calls"] == 60  # the whole server
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
        # The kernel hashes each connection to one worker's socket: keep calling until both
        # workers have calls (8 at least; 24 without seeing both has odds of about 1e-7).
        while len(callers) < 8 or (workers_seen != {"w0", "w1"} and len(callers) < 24):
            c = Caller(url)
            await c.connect()
            callers.append(c)
            workers_seen.add(c.call_id[-2:])
        assert workers_seen == {"w0", "w1"}  # the kernel spread the calls over both processes
        n = len(callers)
        await eventually(lambda: len(stub.sessions) == n, what="an upstream session per call")
        async with aiohttp.ClientSession() as http:
            for path in ("/healthz", "/metrics.json"):  # whichever worker answers, it speaks for the server
                async with http.get(url + path) as r:
                    assert (await r.json())["active_calls"] == n
        # re-attaching works whichever worker the new offer reaches (forwarded to the call's own);
        # six of them all reaching the owner by chance has odds of 1 in 64
        for i in range(6):
            again = Caller(url)
            await again.reattach(callers[i].call_id, callers[i].reconnect_secret)
            assert again.call_id == callers[i].call_id and again.reconnect_secret != callers[i].reconnect_secret
            await asyncio.wait_for(again.channel_open.wait(), 10)
            await callers[i].close()
            callers[i] = again
        assert len(stub.sessions) == n  # the same upstream sessions
        # the operator's sideband and a call's record work whichever worker the request reaches
        # (the socket is carried over to the call's own); Prometheus' page holds both workers
        http = aiohttp.ClientSession()
        sidebands = []
        for c in callers:
            ws = await websockets.connect(f"ws://127.0.0.1:{port}/v1/realtime?call_id={c.call_id}")
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "session.created"
            sidebands.append(ws)
            async with http.get(f"{url}/v1/realtime/calls/{c.call_id}") as r:
                assert r.status == 200 and (await r.json())["status"] == "active"
        async with http.get(url + "/metrics") as r:
            from prometheus_client.parser import text_string_to_metric_families

            families = {f.name: f for f in text_string_to_metric_families(await r.text())}
        active = {s.labels["worker"]: s.value for s in families["bridge_calls_active"].samples}
        assert set(active) == {"0", "1"} and sum(active.values()) == n
        assert sum(s.value for s in families["bridge_sidebands"].samples) == n
        # every hangup succeeds, including those that reach the other worker and are forwarded
        assert [await c.hangup() for c in callers] == [200] * n
        for c, ws in zip(callers, sidebands):
            kinds = [json.loads(m)["type"] async for m in ws]
            assert kinds[-1] == "call.ended" and (ws.close_code, ws.close_reason) == (1000, "call ended")
        await eventually(lambda: True)
        for c in callers:
            for _ in range(50):  # the record's last write is its own task
                async with http.get(f"{url}/v1/realtime/calls/{c.call_id}") as r:
                    record = await r.json()
                if record.get("status") == "ended":
                    break
                await asyncio.sleep(0.05)
            assert record["end_reason"] == "hung up by the client"
        await http.close()
        await eventually(lambda: all(s.ws.state.name == "CLOSED" for s in stub.sessions), what="upstreams closed")
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v1/realtime/calls/{callers[0].call_id}/hangup") as r:
                assert r.status == 404  # gone, whichever worker answers
    finally:
        for c in callers:
            await c.close()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, output
    assert output.count("serving on") == 2 and "Traceback" not in output


def test_worker_reports_combine_when_only_one_worker_has_a_call_s_counters():
    from signaling.routes import _combine

    busy = {"mic": {"frames": 50, "red_recovered": 3}, "lag": {"p50": 1.0, "p99": 4.0}, "loop": None}
    idle = {"mic": {"frames": 0}, "lag": {"p50": 2.0, "p99": 3.0}, "loop": None}
    assert _combine([idle, busy]) == {"mic": {"frames": 50, "red_recovered": 3}, "lag": {"p50": 2.0, "p99": 4.0},
                                      "loop": None}


def test_max_calls_is_one_limit_for_all_workers_not_a_split():
    import os

    from signaling.slots import CallSlots

    slots = CallSlots(3)
    assert slots.take() and slots.take()
    pid = os.fork()
    if pid == 0:  # another worker process, sharing the count
        os._exit(0 if slots.take() and not slots.take() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert slots.used == 3 and slots.full
    slots.give()
    assert not slots.full and slots.take()
