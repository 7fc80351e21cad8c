"""Load-aware admission under offered load, and what HTTP connections can hold.

1. Admission: one analysed probe call is measured alone (unloaded), then cheap
   full-duplex load calls are offered one a second until the server first refuses
   one (503): that offered load is the threshold. Clients then keep offering calls
   until twice that many are asked for, for a window, while the probe is measured
   again. The same run is made against a server with `--admission false` (only
   MAX_CALLS, set to the doubled load) as the baseline: the same offered load,
   everything admitted. Reported: the probe's uplink/downlink marker latency
   (p50/p95) in each phase, the ratio to unloaded, outbound frame lateness, CPU.
2. Idle connections: N TCP connections that never send a byte are opened against
   a server (N past its MAX_CONNECTIONS); reported: connections the server holds
   (and its fds), how long /healthz takes meanwhile, and that a call still connects.

    python bench/admission.py [--quick]

Writes bench/results/admission.json. The clients share the server's two cores, as
in every benchmark here: "capacity" is this machine's, clients included.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ONE_ADDRESS, pcts, write_result  # noqa: E402
from bench.run import ProbeCall, Server, _matched_times, log, stop_all  # noqa: E402
from bench.upstream import InstantUpstream  # noqa: E402


class ClientLag:
    """This (client) process's own event-loop lag: the clients share the cores, and a late
    client loop makes the probe's aiortc receiver buffer more, which reads as server latency."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.02)
            self.samples.append((time.monotonic(), max(0.0, (time.perf_counter() - t - 0.02) * 1000)))

    def between(self, a: float, b: float) -> dict:
        return pcts(ms for t, ms in self.samples if a <= t < b)

    def stop(self) -> None:
        self._task.cancel()


def _window(pairs: list[tuple[float, float]], start: float, end: float) -> list[float]:
    return [lat for t, lat in pairs if start <= t < end]


async def _offer(srv: Server, up: InstantUpstream) -> tuple[ProbeCall | None, str | None]:
    call = ProbeCall(srv.url, up, analyse=False)
    try:
        await call.start()
        return call, None
    except RuntimeError as exc:  # "offer refused: 503 {...}"
        await call.caller.close()
        return None, str(exc)[:300]


async def admission_run(srv: Server, up: InstantUpstream, seconds: float, threshold_calls: int | None) -> dict:
    """`threshold_calls` None: ramp until refused; else offer exactly 2x that (the baseline)."""
    up.mode = "markers"
    client_lag = ClientLag()
    probe = ProbeCall(srv.url, up)
    await probe.start()
    await asyncio.sleep(2.0)
    t_unloaded = time.monotonic()
    await asyncio.sleep(seconds)
    t_ramp = time.monotonic()
    m_unloaded = await srv.metrics(since=seconds)
    load: list[ProbeCall] = []
    refusal = None
    if threshold_calls is None:
        while refusal is None and len(load) < 200:
            call, refused = await _offer(srv, up)
            if call is None:
                refusal = {"offered_calls": len(load) + 2, "admitted_calls": len(load) + 1, "reason": refused}
                break
            load.append(call)
            await asyncio.sleep(1.0)  # the admission signals are 5 s windows: one offer a second
        threshold = refusal["offered_calls"] if refusal else len(load) + 1
    else:
        threshold = threshold_calls
    target = 2 * threshold  # offered: twice what the server first refused at
    log(f"  threshold {threshold} calls ({refusal['reason'] if refusal else 'not refused'}); offering {target}")
    refused_offers = 0

    async def offer_more() -> None:
        nonlocal refused_offers
        call, refused = await _offer(srv, up)
        if call is None:
            refused_offers += 1
            await asyncio.sleep(0.5)  # a refused client retries
        else:
            load.append(call)

    # offered load goes to 2x; then it is held there (refused clients keep retrying) while measured
    t_offer = time.monotonic()
    while len(load) + 1 < target and time.monotonic() - t_offer < 3 * seconds:
        await offer_more()
    t_loaded = time.monotonic()
    deadline = t_loaded + seconds
    cpu0 = srv.stats.cpu_seconds()
    while time.monotonic() < deadline:
        if len(load) + 1 < target:
            await offer_more()
        else:
            await asyncio.sleep(0.5)
    t_end = time.monotonic()
    cores = (srv.stats.cpu_seconds() - cpu0) / (t_end - t_loaded)
    m_loaded = await srv.metrics(since=t_end - t_loaded)
    up_pairs = _matched_times(probe.source.sent, probe.up.detector.onsets)
    down_pairs = _matched_times(probe.up.sent_markers, probe.down.onsets)
    admitted = len(load) + 1
    client_lag.stop()
    await stop_all([probe, *load])
    unloaded = {"uplink_ms": pcts(_window(up_pairs, t_unloaded, t_ramp)),
                "downlink_ms": pcts(_window(down_pairs, t_unloaded, t_ramp)),
                "lateness_ms": m_unloaded["playback"]["lateness_ms"], "loop_lag_ms": m_unloaded["loop_lag_ms"],
                "client_loop_lag_ms": client_lag.between(t_unloaded, t_ramp)}
    loaded = {"uplink_ms": pcts(_window(up_pairs, t_loaded, t_end)),
              "downlink_ms": pcts(_window(down_pairs, t_loaded, t_end)),
              "lateness_ms": m_loaded["playback"]["lateness_ms"], "loop_lag_ms": m_loaded["loop_lag_ms"],
              "client_loop_lag_ms": client_lag.between(t_loaded, t_end),
              "cpu_cores": round(cores, 3), "admitted_calls": admitted, "offered_calls": target,
              "refused_offers": refused_offers}

    def ratio(key: str, p: str) -> float | None:
        a, b = loaded[key][p], unloaded[key][p]
        return round(a / b, 3) if a is not None and b else None

    ratios = {f"{k}_{p}": ratio(k, p) for k in ("uplink_ms", "downlink_ms") for p in ("p50", "p95")}
    log(f"  unloaded up {unloaded['uplink_ms']['p50']}/{unloaded['uplink_ms']['p95']} down "
        f"{unloaded['downlink_ms']['p50']}/{unloaded['downlink_ms']['p95']} ms; at {target} offered, {admitted} admitted: "
        f"up {loaded['uplink_ms']['p50']}/{loaded['uplink_ms']['p95']} down {loaded['downlink_ms']['p50']}/"
        f"{loaded['downlink_ms']['p95']} ms, late p95 {loaded['lateness_ms']['p95']} ms, server loop lag p95 "
        f"{loaded['loop_lag_ms']['p95']} ms, client loop lag p95 {loaded['client_loop_lag_ms']['p95']} ms, {cores:.2f} cores; "
        f"ratios {ratios}")
    return {"threshold_calls": threshold, "refusal": refusal, "unloaded": unloaded, "loaded_2x": loaded,
            "ratio_to_unloaded": ratios}


async def idle_connections(up: InstantUpstream, count: int, cap: int) -> dict:
    srv = Server(["server.py", *ONE_ADDRESS, "--realtime-url", up.url, "--max-connections", str(cap),
                  "--log-level", "WARNING", "--env-file", "/nonexistent"], "bridge_idle")
    socks: list[socket.socket] = []
    try:
        fds0 = srv.stats.fds()
        failed = 0
        t0 = time.monotonic()
        for _ in range(count):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect_ex(("127.0.0.1", srv.port))
                socks.append(s)
            except OSError:
                failed += 1
                s.close()
            if len(socks) % 500 == 0:
                await asyncio.sleep(0.05)  # let the server accept
        await asyncio.sleep(2.0)
        opened_s = time.monotonic() - t0
        health_ms = []
        async with aiohttp.ClientSession() as http:
            for _ in range(10):
                t = time.monotonic()
                async with http.get(srv.url + "/healthz", timeout=aiohttp.ClientTimeout(total=10)) as r:
                    assert r.status == 200
                health_ms.append((time.monotonic() - t) * 1000)
            async with http.get(srv.url + "/metrics.json") as r:
                conns = (await r.json())["http_connections"]
        fds = srv.stats.fds()
        call, refused = await _offer(srv, up)
        if call is not None:
            await call.stop()
        result = {"connections_opened": len(socks), "client_errors": failed, "seconds": round(opened_s, 1),
                  "server_cap": conns["cap"], "server_open_connections": conns["open"],
                  "evicted": conns["evicted"], "refused": conns["refused"], "server_fds_before": fds0,
                  "server_fds_during": fds, "healthz_ms": pcts(health_ms), "call_connected": call is not None,
                  "call_refusal": refused, "log_bytes": (Path("bench/results") / "bridge_idle.log").stat().st_size}
        log(f"  {len(socks)} silent connections: server holds {conns['open']} (cap {conns['cap']}), fds {fds0} → {fds}, "
            f"/healthz p50 {result['healthz_ms']['p50']} ms, a call {'connected' if call else 'refused: ' + str(refused)}, "
            f"log {result['log_bytes']} bytes")
        return result
    finally:
        for s in socks:
            s.close()
        srv.stop()


async def main(quick: bool) -> dict:
    up = await InstantUpstream().start()
    seconds = 8.0 if quick else 20.0
    results: dict = {"quick": quick, "seconds_per_phase": seconds}
    common = [*ONE_ADDRESS, "--realtime-url", up.url, "--log-level", "WARNING", "--media-timeout", "60",
              "--env-file", "/nonexistent"]
    try:
        log("admission on: ramp until refused, then offer twice that")
        srv = Server(["server.py", *common, "--max-calls", "500"], "bridge_admission")
        try:
            results["admission"] = await admission_run(srv, up, seconds, None)
        finally:
            srv.stop()
        threshold = results["admission"]["threshold_calls"]
        log(f"baseline, admission off (MAX_CALLS {2 * threshold}): the same offered load, all admitted")
        srv = Server(["server.py", *common, "--admission", "false", "--max-calls", str(2 * threshold)],
                     "bridge_no_admission")
        try:
            results["no_admission"] = await admission_run(srv, up, seconds, threshold)
        finally:
            srv.stop()
        log("idle connections")
        results["idle_connections"] = await idle_connections(up, 5000 if quick else 19000, 1000)
    finally:
        await up.stop()
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter phases, fewer idle connections")
    args = ap.parse_args()
    out = asyncio.run(main(args.quick))
    print(f"wrote {write_result('admission_quick' if args.quick else 'admission', out)}")
