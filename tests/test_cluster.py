"""A cluster of three nodes, each `server.py --redis-url` in its own network namespace (its
own address), a real redis-server, real aiortc callers: placement, per-call forwarding,
a node killed, the cluster's MAX_CALLS, draining."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
import pytest
import websockets

from harness.caller import Caller
from harness.cluster import ClusterNet
from harness.stub import RealtimeStub

WHY_NOT = ClusterNet.unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

TOKEN = "cluster-operator-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_three_nodes_place_forward_lose_a_node_fill_up_and_drain(tmp_path):
    import redis.asyncio as redis

    callers: list[Caller] = []
    with ClusterNet(3) as net:
        redis_url = net.start_redis()
        async with RealtimeStub(host=net.host_ip) as stub:
            common = ["--redis-url", redis_url, "--cluster-secret", "shared-cluster-secret", "--realtime-url",
                      stub.url, "--max-calls", "4", "--offers-per-minute", "0", "--pending-offers-per-address", "0",
                      "--drain-seconds", "20", "--connect-timeout", "60", "--reconnect-grace", "0",
                      "--media-timeout", "120", "--admission", "false", "--log-level", "DEBUG"]  # placement by calls alone here
            nodes = [net.start_node(i, *common, "--records-db", str(tmp_path / f"node{i}.db"),
                                    env={"BRIDGE_AUTH_TOKEN": TOKEN}) for i in range(3)]
            for node in nodes:
                await asyncio.to_thread(net.wait_ready, node)
            r = redis.from_url(redis_url)
            http = aiohttp.ClientSession()
            try:
                async def registered(n: int):
                    return len(await r.smembers("bridge:nodes")) == n
                await _until(lambda: registered(3), 10, "three nodes in the registry")

                async def call_via(node, headers=AUTH) -> Caller:
                    c = Caller(node.url)
                    await c.connect(headers=headers)
                    callers.append(c)
                    return c

                # 1. offers all sent to node 0 land on the least-loaded nodes: one each
                first = [await call_via(nodes[0]) for _ in range(3)]
                placed = [c.answer_headers["X-Bridge-Node"] for c in first]
                assert sorted(placed) == ["node0", "node1", "node2"], placed
                for c in first:
                    await asyncio.wait_for(c.channel_open.wait(), 15)

                # an ephemeral key minted by one node is good on every node
                async with http.post(nodes[1].url + "/v1/realtime/client_secrets", json={}, headers=AUTH) as resp:
                    key = (await resp.json())["value"]

                # 2. a hangup sent to one node ends a call another node holds; its record is found anywhere
                on2 = first[placed.index("node2")]
                async with http.post(f"{nodes[1].url}/v1/realtime/calls/{on2.call_id}/hangup") as resp:
                    assert resp.status == 200
                callers.remove(on2)
                await on2.close()

                async def node2_idle():
                    async with http.get(nodes[2].url + "/healthz") as resp:
                        return (await resp.json())["active_calls"] == 0
                await _until(node2_idle, 10, "node 2 without calls")
                async with http.get(f"{nodes[0].url}/v1/realtime/calls/{on2.call_id}", headers=AUTH) as resp:
                    record = await resp.json()
                assert resp.status == 200 and record["node"] == "node2" and record["status"] == "ended"

                # the operator's sideband, through any node, reaches the node holding the call
                on1_first = first[placed.index("node1")]
                ws_url = f"ws://{nodes[0].address}:{nodes[0].port}/v1/realtime?call_id={on1_first.call_id}"
                async with websockets.connect(ws_url, additional_headers=AUTH) as ws:
                    assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "session.created"
                    await ws.send(json.dumps({"type": "response.create"}))
                    while json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] != "response.done":
                        pass
                # and the list of records covers every node
                async with http.get(f"{nodes[1].url}/v1/realtime/calls?since=0", headers=AUTH) as resp:
                    listed = {c["id"]: c["node"] for c in (await resp.json())["data"]}
                assert listed[on2.call_id] == "node2" and set(listed.values()) == {"node0", "node1", "node2"}

                # 3. the cluster's MAX_CALLS (4) counts every node: two more fit, the next gets 503
                more = [await call_via(nodes[2], {"Authorization": f"Bearer {key}"}), await call_via(nodes[1])]
                got = {c.answer_headers["X-Bridge-Node"] for c in more}
                assert got >= {"node2"}, (got, str(tmp_path))
                with pytest.raises(RuntimeError, match="503.*too_many_calls") as refused:
                    await call_via(nodes[0])
                assert "cluster is at its limit of 4" in str(refused.value)
                live = [c for c in callers]
                assert len(live) == 4

                # 4. node 2 is killed: its calls answer 404 within the TTL, its entries vanish, and
                #    its slots come back to the cluster
                doomed = [c for c in live if c.answer_headers["X-Bridge-Node"] == "node2"]
                assert doomed
                net.stop_node(nodes[2], signal.SIGKILL)
                killed_at = time.monotonic()

                async def gone():
                    async with http.post(f"{nodes[0].url}/v1/realtime/calls/{doomed[0].call_id}/hangup") as resp:
                        return resp.status == 404
                await _until(gone, 8, "the dead node's call to answer 404")
                assert time.monotonic() - killed_at < 7

                async def entries_gone():
                    return (await r.get("bridge:node:node2") is None
                            and not [c for c in doomed if await r.get(f"bridge:call:{c.call_id}") is not None])
                await _until(entries_gone, 1, "node 2's registry entries to vanish")
                assert time.monotonic() - killed_at < 7
                await _until(lambda: registered(2), 5, "the registry without node 2")
                for c in doomed:
                    callers.remove(c)
                    await c.close()
                started = time.monotonic()
                async with http.post(f"{nodes[1].url}/v1/realtime/calls/{doomed[0].call_id}/hangup") as resp:
                    assert resp.status == 404 and time.monotonic() - started < 1.0  # promptly, not a hang
                replacement = await call_via(nodes[0])  # room again: node 2's slots were given back
                assert replacement.answer_headers["X-Bridge-Node"] in ("node0", "node1")

                # 5. draining node 1: new offers sent to it go elsewhere, its live calls go on
                on1 = [c for c in callers if c.answer_headers["X-Bridge-Node"] == "node1"]
                assert on1
                nodes[1].proc.send_signal(signal.SIGTERM)

                async def draining():
                    async with http.get(nodes[1].url + "/readyz") as resp:
                        return resp.status == 503
                await _until(draining, 5, "node 1 draining")
                for c in list(callers):  # make room under MAX_CALLS for the offers below
                    if c not in on1:
                        async with http.post(f"{nodes[0].url}/v1/realtime/calls/{c.call_id}/hangup") as resp:
                            assert resp.status == 200
                        callers.remove(c)
                        await c.close()

                async def room():  # their slots are given back by tasks of their own
                    return sum(int(v) for v in (await r.hgetall("bridge:slots")).values()) < 4
                await _until(room, 5, "room under MAX_CALLS")
                elsewhere = await call_via(nodes[1])
                assert elsewhere.answer_headers["X-Bridge-Node"] == "node0"
                async with http.get(nodes[1].url + "/healthz") as resp:
                    health = await resp.json()
                assert health["draining"] is True and health["active_calls"] == len(on1)  # still serving them
                assert nodes[1].proc.poll() is None
                for c in on1:
                    async with http.post(f"{nodes[0].url}/v1/realtime/calls/{c.call_id}/hangup") as resp:
                        assert resp.status == 200  # forwarded to the draining node, which still serves it
                # with its last call gone, the draining node stops by itself (well before DRAIN_SECONDS)
                await asyncio.to_thread(nodes[1].proc.wait, 10)
                assert nodes[1].proc.returncode == 0, nodes[1].output()[-2000:]
                await _until(lambda: registered(1), 5, "the registry without node 1")
            finally:
                await http.close()
                for c in callers:
                    await c.close()
                await r.aclose()
                outputs = {n.index: n.output() for n in nodes}
                for i, text in outputs.items():  # kept beside the test's other files, for a failure
                    (tmp_path / f"node{i}.log").write_text(text)
    for i, text in outputs.items():
        assert "Traceback" not in text, f"node {i}:\n{text[-3000:]}"
