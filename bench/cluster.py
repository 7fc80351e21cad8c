"""A cluster of nodes on this machine: what it sustains with 1, 2 and 3 nodes, and what
placing an offer on another node adds to signaling.

Nodes are `server.py --redis-url` in network namespaces (harness/cluster.py: their own
addresses on a Linux bridge), with a real redis-server; the upstream answers at once
(bench/upstream.py); callers are cheap full-duplex aiortc peers (pre-encoded Opus out,
nothing decoded in) run from this process.

1. Signaling: two nodes, A and B; A holds eight calls, B none, so A places every offer
   it is sent on B and B keeps those it is sent. Offers are POSTed alternately to B
   (made where they arrived: the baseline) and to A (forwarded to B, the answer
   relayed), each hung up at once. Reported: the offer's round trip, p50/p99, each way,
   and the difference.
2. Capacity: 1, 2, then 3 nodes; cheap calls are offered to node 0, one a second, until
   the cluster refuses one (every node's admission says it is loaded, 503); reported:
   the calls admitted, how they were spread, and whether they were all still connected
   10 s later. The callers run on CPU 0 (`sched_setaffinity`); the nodes may use both
   cores, so with two cores the third node has none of its own: this machine can show
   1 → 2, not 2 → 3.

    sudo python bench/cluster.py [--quick]

Writes bench/results/cluster.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiortc import RTCPeerConnection  # noqa: E402

from bench.common import ProcStats, pcts, write_result  # noqa: E402
from bench.run import ProbeCall, log, stop_all  # noqa: E402
from bench.upstream import InstantUpstream  # noqa: E402
from harness.caller import SourceTrack  # noqa: E402
from harness.cluster import ClusterNet  # noqa: E402
from cluster.node import CLUSTER_HEADER, cluster_token  # noqa: E402

SECRET = "bench-cluster-secret"


def node_args(redis_url: str, upstream: str, tmp: Path, i: int) -> list[str]:
    return ["--redis-url", redis_url, "--cluster-secret", SECRET, "--realtime-url", upstream, "--max-calls", "400",
            "--offers-per-minute", "0", "--pending-offers-per-address", "0", "--log-level", "WARNING",
            "--records-db", str(tmp / f"node{i}.db"), "--connect-timeout", "60"]


async def _offer_sdp() -> str:
    pc = RTCPeerConnection()
    pc.addTrack(SourceTrack())
    pc.createDataChannel("oai-events")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def signaling(net: ClusterNet, redis_url: str, up: InstantUpstream, tmp: Path, n: int) -> dict:
    a, b = (net.start_node(i, *node_args(redis_url, up.url, tmp, i)) for i in range(2))
    for node in (a, b):
        await asyncio.to_thread(net.wait_ready, node)
    await asyncio.sleep(2.0)  # both registered and seen
    sdp = await _offer_sdp()
    times: dict[str, list[float]] = {"direct": [], "forwarded": []}
    placed: dict[str, list[str]] = {"direct": [], "forwarded": []}
    async with aiohttp.ClientSession() as http:
        # eight calls made on A itself (as a node placing them there would), so that A
        # places every offer it is sent on B, and B keeps those it is sent
        trusted = {"Content-Type": "application/sdp", CLUSTER_HEADER: cluster_token(SECRET)}
        held = []
        for _ in range(8):  # more than A can place on B between two of B's heartbeats
            async with http.post(a.url + "/v1/realtime/calls", data=sdp, headers=trusted) as r:
                assert r.status == 201, await r.text()
                held.append(r.headers["Location"].rsplit("/", 1)[-1])
        await asyncio.sleep(2.5)  # A's heartbeat carries them
        for i in range(2 * n):
            node = (a, b)[i % 2]
            t0 = time.perf_counter()
            async with http.post(node.url + "/v1/realtime/calls", data=sdp,
                                 headers={"Content-Type": "application/sdp"}) as r:
                await r.read()
                elapsed = (time.perf_counter() - t0) * 1000
                status, where = r.status, r.headers.get("X-Bridge-Node")
                call_id = r.headers.get("Location", "/").rsplit("/", 1)[-1]
            if status == 201:
                way = "direct" if where == node.node_id else "forwarded"
                times[way].append(elapsed)
                placed[way].append(f"{node.node_id}->{where}")
                async with http.post(f"{node.url}/v1/realtime/calls/{call_id}/hangup") as r:
                    await r.read()
            await asyncio.sleep(0.05)
        for call_id in held:
            async with http.post(f"{a.url}/v1/realtime/calls/{call_id}/hangup") as r:
                await r.read()
    for node in (a, b):
        net.stop_node(node)
    net.nodes.clear()
    out = {way: pcts(v) for way, v in times.items()}
    out["placed_on"] = {way: {n: v.count(n) for n in set(v)} for way, v in placed.items()}
    out["forwarding_adds_ms"] = {p: round(out["forwarded"][p] - out["direct"][p], 1)
                                 for p in ("p50", "p99") if out["forwarded"][p] is not None}
    log(f"signaling: direct {out['direct']}, forwarded {out['forwarded']}, adds {out['forwarding_adds_ms']}, "
        f"placed {out['placed_on']}")
    return out


async def capacity(net: ClusterNet, redis_url: str, up: InstantUpstream, tmp: Path, count: int, limit: int) -> dict:
    nodes = [net.start_node(i, *node_args(redis_url, up.url, tmp, i)) for i in range(count)]
    for node in nodes:
        await asyncio.to_thread(net.wait_ready, node)
    await asyncio.sleep(2.0)
    calls: list[ProbeCall] = []
    spread: dict[str, int] = {}
    refusal = None
    t0 = time.monotonic()
    times = os.times()
    cpu0 = times.user + times.system
    while len(calls) < limit:
        call = ProbeCall(nodes[0].url, up, analyse=False)
        try:
            await call.start()
        except RuntimeError as exc:
            await call.caller.close()
            refusal = str(exc)[:200]
            break
        calls.append(call)
        where = call.caller.answer_headers.get("X-Bridge-Node", "?")
        spread[where] = spread.get(where, 0) + 1
        await asyncio.sleep(1.0)
    ramp_s = time.monotonic() - t0
    times = os.times()
    client_cores = round((times.user + times.system - cpu0) / ramp_s, 2)
    why_not: dict[str, str] = {}
    async with aiohttp.ClientSession() as http:
        for node in nodes:  # each node's own reason for refusing, at the end of the ramp
            async with http.get(node.url + "/readyz") as r:
                why_not[node.node_id] = "ready" if r.status == 200 else (await r.json())["error"]["message"][:160]
    # what the machine does with the calls it took: each node's CPU, and the machine's
    stats = [ProcStats(n.proc.pid) for n in nodes]
    node_cpu0, busy0 = [st.cpu_seconds() for st in stats], _machine_busy()
    h0 = time.monotonic()
    await asyncio.sleep(10.0)
    held_s = time.monotonic() - h0
    node_cores = [round((st.cpu_seconds() - c) / held_s, 2) for st, c in zip(stats, node_cpu0)]
    machine_cores = round((_machine_busy() - busy0) / held_s, 2)
    connected = sum(1 for c in calls if c.caller.pc.connectionState == "connected")
    async with aiohttp.ClientSession() as http:
        active = 0
        for node in nodes:
            async with http.get(node.url + "/healthz") as r:
                active += (await r.json())["active_calls"]
    await stop_all(calls)
    for node in nodes:
        net.stop_node(node)
    net.nodes.clear()
    out = {"nodes": count, "admitted_calls": len(calls), "still_connected_10s_later": connected,
           "active_on_nodes": active, "spread": dict(sorted(spread.items())), "refusal": refusal,
           "ramp_seconds": round(ramp_s, 1), "hit_the_bench_limit": refusal is None,
           "client_process_cores": client_cores, "nodes_at_the_end": why_not,
           "node_cores_while_held": node_cores, "machine_busy_cores_while_held": machine_cores,
           "machine_cores": os.cpu_count()}
    log(f"capacity with {count} node(s): {len(calls)} calls admitted ({spread}), {connected} connected 10 s later; "
        f"clients used {client_cores} cores; nodes used {node_cores} cores, the machine {machine_cores} of "
        f"{os.cpu_count()}; nodes: {why_not}")
    return out


def _machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all but idle and iowait), from /proc/stat."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


async def main(quick: bool) -> dict:
    why = ClusterNet.unavailable()
    if why:
        raise SystemExit(f"bench/cluster.py: {why}")
    os.sched_setaffinity(0, {0})  # the callers on CPU 0
    tmp = Path("/tmp/bench-cluster")
    tmp.mkdir(exist_ok=True)
    with ClusterNet(3, subnet="10.211.0", prefix="bnode", bridge="bnodebr0") as net:
        redis_url = net.start_redis()
        up = await InstantUpstream(mode="markers", host=net.host_ip).start()  # model audio to every call
        try:
            sig = await signaling(net, redis_url, up, tmp, 15 if quick else 100)
            cap = [await capacity(net, redis_url, up, tmp, n, 30 if quick else 150) for n in (1, 2, 3)]
        finally:
            await up.stop()
    result = {"signaling_ms": sig, "capacity": cap}
    path = write_result("cluster", result)
    log(f"wrote {path}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    asyncio.run(main(parser.parse_args().quick))
