"""The measuring stick: latency, capacity, memory, lossy networks, the aiortc floor,
and the WebSocket-relay design we replace.

    python bench/run.py            # full suite (several minutes)
    python bench/run.py --quick    # reduced, < 60 s; writes bench/results/run_quick.json only

The server under test (`server.py`) and the bare-aiortc baseline run as their own
processes; their CPU, RSS, fds and threads are read from /proc. Callers are aiortc
peers sending real Opus at 20 ms; the upstream answers instantly (bench/upstream.py)
so what is measured is the bridge, not a model. Results: bench/results/*.json,
BENCHMARKS.md, bench/plots/*.png; the last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402

from bench.common import ONE_ADDRESS, ProcStats, free_port, pcts, start_process, wait_http, write_result, RESULTS  # noqa: E402
from bench.impair import Impairment  # noqa: E402
from bench.markers import MarkerSource, OnsetDetector, PreEncodedSource, pair  # noqa: E402
from bench.upstream import InstantUpstream, UpSession  # noqa: E402
from harness.caller import Caller  # noqa: E402

for noisy in ("aioice", "aiortc"):
    logging.getLogger(noisy).setLevel(logging.ERROR)


_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:5.1f}s] {msg}", flush=True)


class ProbeCall:
    """A caller whose audio is analysed both ways: markers up, markers (or echoes) down, gaps."""

    def __init__(self, base_url: str, upstream: Optional[InstantUpstream] = None,
                 impairment: Optional[Impairment] = None, analyse: bool = True) -> None:
        # Load callers (analyse=False) are made cheap: pre-encoded Opus out, nothing decoded in,
        # so the machine's two cores measure the server, not its clients.
        self.analyse = analyse
        self.source = MarkerSource() if analyse else PreEncodedSource()
        self.down = OnsetDetector(48000)
        self._next_pts: Optional[int] = None
        self.upstream = upstream
        self.up: Optional[UpSession] = None
        self.impairment = impairment
        self.caller = Caller(base_url, source=self.source, keep_audio=False, on_frame=self._frame if analyse else None)

    def _frame(self, frame, now: float) -> None:
        missing = 0
        if frame.pts is not None:
            if self._next_pts is not None and frame.pts > self._next_pts:
                missing = frame.pts - self._next_pts
            self._next_pts = frame.pts + frame.samples
        x = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0]
        self.down.feed(x, now, missing)

    async def start(self) -> None:
        before = len(self.upstream.sessions) if self.upstream else 0
        await self.caller.connect()
        if not self.analyse:
            for t in self.caller.pc.getTransceivers():
                t.receiver._enabled = False  # aiortc drops incoming RTP before depacketising
        if self.impairment:
            self.impairment.attach(self.caller.pc)
        if self.upstream:
            for _ in range(200):
                if len(self.upstream.sessions) > before:
                    break
                await asyncio.sleep(0.01)
            self.up = self.upstream.sessions[before]

    async def stop(self) -> None:
        try:
            await self.caller.hangup()
        except aiohttp.ClientError:
            pass
        await self.caller.close()
        self.down.finish()

    def uplink_ms(self) -> tuple[list[float], int]:
        return pair(self.source.sent, self.up.detector.onsets) if self.up else ([], 0)

    def downlink_ms(self) -> tuple[list[float], int]:
        return pair(self.up.sent_markers, self.down.onsets) if self.up else ([], 0)

    def round_trip_ms(self) -> tuple[list[float], int]:
        return pair(self.source.sent, self.down.onsets)


class Server:
    def __init__(self, args: list[str], name: str, host: str = "127.0.0.1") -> None:
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        self.proc = start_process([*args, "--port", str(self.port)], log=RESULTS / f"{name}.log")
        wait_http(self.url + "/healthz")
        self.stats = ProcStats(self.proc.pid)

    async def metrics(self, since: float = 60) -> dict:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{self.url}/metrics.json?since={since}") as r:
                return await r.json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except Exception:
            self.proc.kill()


async def load_calls(url: str, n: int, upstream: Optional[InstantUpstream]) -> list[ProbeCall]:
    calls = [ProbeCall(url, upstream, analyse=False) for _ in range(n)]
    try:
        for c in calls:  # one at a time: set-up bursts are not what we measure
            await c.start()
    except BaseException:
        await stop_all(calls)  # a refused offer must not leave the others running into the next section
        raise
    return calls


async def stop_all(calls: list[ProbeCall]) -> None:
    await asyncio.gather(*(c.stop() for c in calls), return_exceptions=True)


async def cpu_window(stats: ProcStats, seconds: float) -> float:
    """Cores used by the process over `seconds`."""
    c0, t0 = stats.cpu_seconds(), time.monotonic()
    await asyncio.sleep(seconds)
    return (stats.cpu_seconds() - c0) / (time.monotonic() - t0)


def _matched_times(sent, seen) -> list[tuple[float, float]]:
    """(send time, latency ms) for each marker that arrived."""
    out = []
    for t, code in sent:
        lat, lost = pair([(t, code)], seen)
        if lat:
            out.append((t, lat[0]))
    return out


def merge_latency(runs: list[dict]) -> dict:
    up = [x for r in runs for x in r["uplink_samples"]]
    down = [x for r in runs for x in r["downlink_samples"]]
    return {"uplink_ms": pcts(up), "downlink_ms": pcts(down),
            "uplink_lost": sum(r["uplink_lost"] for r in runs), "downlink_lost": sum(r["downlink_lost"] for r in runs),
            "uplink_samples": up, "downlink_samples": down, "runs": len(runs), "seconds": runs[0]["seconds"],
            "spread": {"uplink_p50": [r["uplink_ms"]["p50"] for r in runs],
                       "downlink_p50": [r["downlink_ms"]["p50"] for r in runs]}}


def merge_cost(runs: list[dict]) -> dict:
    """Median of the repeats, with every repeat's CPU per call kept as the spread."""
    per_call = sorted(r["cpu_per_call"] for r in runs)
    mid = sorted(runs, key=lambda r: r["cpu_per_call"])[len(runs) // 2]
    return {**mid, "cpu_per_call_runs": per_call,
            "round_trip_p50_runs": [r["round_trip_ms"]["p50"] for r in runs]}


# -- sections ----------------------------------------------------------------------------


async def latency_one_call(srv: Server, up: InstantUpstream, seconds: float) -> dict:
    up.mode = "first-audio"
    probe = ProbeCall(srv.url, up)
    await probe.start()
    await asyncio.sleep(seconds)
    await probe.stop()
    upl, up_lost = probe.uplink_ms()
    dnl, dn_lost = probe.downlink_ms()
    return {"uplink_ms": pcts(upl), "downlink_ms": pcts(dnl), "uplink_lost": up_lost, "downlink_lost": dn_lost,
            "uplink_samples": upl, "downlink_samples": dnl, "seconds": seconds}


async def echo_cost(url: str, stats: ProcStats, up: Optional[InstantUpstream], n: int, seconds: float) -> dict:
    """n full-duplex echo calls: server CPU per call, and one probe's round trip."""
    if up:
        up.mode = "echo"
    probe = ProbeCall(url, up)
    await probe.start()
    load = await load_calls(url, n - 1, up)
    await asyncio.sleep(1.0)
    cores = await cpu_window(stats, seconds)
    rtt, lost = probe.round_trip_ms()
    await stop_all([probe, *load])
    return {"calls": n, "cpu_cores": round(cores, 3), "cpu_per_call": round(cores / n, 4),
            "round_trip_ms": pcts(rtt), "round_trip_lost": lost, "rss_mb": round(stats.rss_mb(), 1)}


async def capacity(srv: Server, up: InstantUpstream, steps: list[int], seconds: float, settle: float) -> dict:
    up.mode = "markers"
    rows = []
    refused = None
    base_rss = srv.stats.rss_mb()
    base_p95 = None
    for n in steps:
        probe = ProbeCall(srv.url, up)
        await probe.start()
        try:
            load = await load_calls(srv.url, n - 1, up)
        except Exception as exc:  # the server refusing (load-aware admission) is an answer too
            log(f"  capacity: could not set up {n} calls: {exc}")
            refused = {"calls": n, "reason": str(exc)[:300]}
            await probe.stop()
            break
        await asyncio.sleep(settle)
        m0 = await srv.metrics()
        cores = await cpu_window(srv.stats, seconds)
        m = await srv.metrics(since=seconds)
        rss = srv.stats.rss_mb()
        upl, _ = probe.uplink_ms()
        await stop_all([probe, *load])
        up_p95 = pcts(upl)["p95"]
        base_p95 = base_p95 or up_p95
        lost = m["mic"]["lost_frames"] - m0["mic"]["lost_frames"]
        late_p99 = m["playback"]["lateness_ms"]["p99"]
        # "uplink p95 doubling", with a one-frame floor: doubling a 3 ms figure is scheduling noise
        behind = (late_p99 > 20) or lost > 0 or (
            up_p95 is not None and base_p95 is not None and up_p95 > max(2 * base_p95, base_p95 + 20))
        row = {"calls": n, "cpu_cores": round(cores, 3), "cpu_per_call": round(cores / n, 4),
               "loop_lag_ms": m["loop_lag_ms"], "playback_lateness_ms": m["playback"]["lateness_ms"],
               "mic_lost_frames": lost, "uplink_ms": pcts(upl), "rss_mb": round(rss, 1),
               "rss_per_call_mb": round((rss - base_rss) / n, 2), "threads": srv.stats.threads(),
               "fell_behind": bool(behind)}
        rows.append(row)
        log(f"  {n:3d} calls: {cores:.2f} cores ({cores / n:.3f}/call), loop lag p99 {m['loop_lag_ms']['p99']} ms, "
            f"late p99 {late_p99} ms, lost {lost}, uplink p95 {up_p95} ms{'  ← fell behind' if behind else ''}")
        await asyncio.sleep(settle / 2)
        if behind:
            break
    ok = [r["calls"] for r in rows if not r["fell_behind"]]
    return {"steps": rows, "max_calls": max(ok) if ok else 0, "refused": refused, "criteria":
            "outbound frame lateness p99 <= 20 ms, no lost mic frames, uplink p95 below max(2x, +20 ms) its 1-call value"}


async def memory_cycles(srv: Server, cycles: int) -> dict:
    async def one() -> None:
        c = Caller(srv.url, keep_audio=False)
        await c.connect()
        await asyncio.sleep(0.1)
        await c.hangup()
        await c.close()

    await one()  # warm: first-call imports and caches are not leaks
    await asyncio.sleep(0.5)
    before = {"rss_mb": srv.stats.rss_mb(), "fds": srv.stats.fds(), "threads": srv.stats.threads()}
    t0 = time.monotonic()
    for _ in range(cycles):
        await one()
    await asyncio.sleep(1.5)
    after = {"rss_mb": srv.stats.rss_mb(), "fds": srv.stats.fds(), "threads": srv.stats.threads()}
    health = await srv.metrics()
    return {"cycles": cycles, "seconds": round(time.monotonic() - t0, 1), "before": before, "after": after,
            "rss_growth_per_cycle_kb": round((after["rss_mb"] - before["rss_mb"]) * 1024 / cycles, 1),
            "active_calls_after": health["active_calls"]}


async def lossy(srv: Server, up: InstantUpstream, losses: list[float], seconds: float) -> dict:
    up.mode = "markers"
    rows = []
    for loss in losses:
        imp = Impairment(loss=loss, burst=3.0, jitter_ms=30.0, reorder=0.01, seed=7)
        probe = ProbeCall(srv.url, up, imp)
        await probe.start()
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        await probe.stop()
        minutes = seconds / 60
        upl, up_lost = probe.uplink_ms()
        dnl, dn_lost = probe.downlink_ms()
        sent_up = probe.source.sent
        half = t0 + seconds / 2
        matched = _matched_times(sent_up, probe.up.detector.onsets)
        first = [lat for s, lat in matched if s < half]
        second = [lat for s, lat in matched if s >= half]
        rows.append({
            "loss_pct": loss * 100,
            "uplink_ms": pcts(upl), "uplink_first_half_ms": pcts(first), "uplink_second_half_ms": pcts(second),
            "downlink_ms": pcts(dnl),
            "uplink_gaps_per_min": round(len(probe.up.detector.gaps_ms) / minutes, 1),
            "downlink_gaps_per_min": round(len(probe.down.gaps_ms) / minutes, 1),
            "uplink_markers_lost": up_lost, "downlink_markers_lost": dn_lost, "markers_sent": len(sent_up),
            "packets": {"up_sent": imp.up.sent, "up_dropped": imp.up.dropped,
                        "down_sent": imp.down.sent, "down_dropped": imp.down.dropped},
            "uplink_series": [(round(s - t0, 2), round(lat, 1)) for s, lat in matched],
        })
        r = rows[-1]
        log(f"  loss {loss * 100:4.0f}%: uplink p50/p95 {r['uplink_ms']['p50']}/{r['uplink_ms']['p95']} ms "
            f"(2nd half p50 {r['uplink_second_half_ms']['p50']}), gaps/min up {r['uplink_gaps_per_min']} "
            f"down {r['downlink_gaps_per_min']}, markers lost up {up_lost} down {dn_lost}")
    return {"seconds_per_level": seconds, "impairment": "Gilbert-Elliott mean burst 3, jitter ±30 ms, 1 % reorder, "
            "applied to the caller's RTP both ways", "levels": rows}


# -- main --------------------------------------------------------------------------------


async def run(quick: bool) -> dict:
    started = time.monotonic()
    up = await InstantUpstream().start()
    results: dict = {"quick": quick}
    srv = Server(["server.py", *ONE_ADDRESS, "--realtime-url", up.url, "--max-calls", "500", "--log-level", "WARNING",
                  "--media-timeout", "60", "--env-file", "/nonexistent"], "bridge")
    try:
        warm = ProbeCall(srv.url, up)
        await warm.start()
        await asyncio.sleep(0.5)
        await warm.stop()

        repeats = 1 if quick else 3
        log(f"1. latency, one call ({repeats} run{'s' if repeats > 1 else ''})")
        runs = [await latency_one_call(srv, up, 5 if quick else 20) for _ in range(repeats)]
        results["latency"] = merge_latency(runs)
        lat = results["latency"]
        log(f"  uplink {lat['uplink_ms']}  downlink {lat['downlink_ms']}  spread of p50 across runs: "
            f"up {lat['spread']['uplink_p50']} down {lat['spread']['downlink_p50']}")

        n_cost = 5 if quick else 10
        log(f"5. baseline vs bridge, {n_cost} full-duplex echo calls ({repeats} run{'s' if repeats > 1 else ''} each)")
        base_srv = Server(["bench/baseline_echo.py"], "baseline")
        try:
            ours_runs, base_runs = [], []
            for _ in range(repeats):  # interleaved, so drift in the machine hits both alike
                ours_runs.append(await echo_cost(srv.url, srv.stats, up, n_cost, 3 if quick else 10))
                base_runs.append(await echo_cost(base_srv.url, base_srv.stats, None, n_cost, 3 if quick else 10))
        finally:
            base_srv.stop()
        ours, baseline = merge_cost(ours_runs), merge_cost(base_runs)
        results["baseline"] = {"bridge": ours, "bare_aiortc_echo": baseline, "ratios": {
            "cpu_per_call": round(ours["cpu_per_call"] / max(1e-9, baseline["cpu_per_call"]), 2),
            "round_trip_p50": round((ours["round_trip_ms"]["p50"] or 0) / max(1e-9, baseline["round_trip_ms"]["p50"] or 1), 2),
        }}
        log(f"  bridge {ours['cpu_per_call']} cores/call, RTT {ours['round_trip_ms']}")
        log(f"  bare   {baseline['cpu_per_call']} cores/call, RTT {baseline['round_trip_ms']}")

        log("2. capacity")
        steps = [1, 5, 10] if quick else [1, 2, 4, 6, 8, 10, 12, 15, 20, 25, 30, 40]
        results["capacity"] = await capacity(srv, up, steps, 2.5 if quick else 10, 1.0 if quick else 2.0)

        if not quick:
            log("2b. capacity with --workers 2 (one process per core)")
            two = Server(["server.py", *ONE_ADDRESS, "--workers", "2", "--realtime-url", up.url, "--max-calls", "500",
                          "--log-level", "WARNING", "--media-timeout", "60", "--env-file", "/nonexistent"], "bridge_2w")
            try:
                results["capacity_2_workers"] = await capacity(two, up, steps, 10, 2.0)
            finally:
                two.stop()

        log("3. memory")
        results["memory"] = await memory_cycles(srv, 15 if quick else 300)
        mem = results["memory"]
        log(f"  {mem['cycles']} cycles: rss {mem['before']['rss_mb']:.1f} → {mem['after']['rss_mb']:.1f} MB, "
            f"fds {mem['before']['fds']} → {mem['after']['fds']}, threads {mem['before']['threads']} → {mem['after']['threads']}")

        levels = [0.0, 0.05] if quick else [0.0, 0.02, 0.05, 0.10, 0.20]
        log("4. lossy networks (this bridge: reorder receive buffer)")
        results["loss"] = await lossy(srv, up, levels, 4 if quick else 60)
    finally:
        srv.stop()
    try:
        if not quick:
            log("4b. lossy networks, same bridge with aiortc's own jitter buffer (--audio-path aiortc)")
            old = Server(["server.py", *ONE_ADDRESS, "--realtime-url", up.url, "--log-level", "WARNING", "--audio-path", "aiortc",
                          "--media-timeout", "60", "--env-file", "/nonexistent"], "bridge_aiortc_jb")
            try:
                results["loss_aiortc_buffer"] = await lossy(old, up, levels, 30)
            finally:
                old.stop()
    finally:
        await up.stop()

    log("6. WebSocket relay vs RTP under TCP/UDP loss (network namespace)")
    if quick:
        results["relay_vs_rtp"] = {"skipped": "not run in --quick mode (needs root, network namespaces, minutes)"}
    else:
        from bench.netns import relay_vs_rtp

        results["relay_vs_rtp"] = await relay_vs_rtp()
    log(f"  {json.dumps(results['relay_vs_rtp'])[:300]}")
    log("7. a real browser under real loss, our Opus path vs aiortc's (network namespace)")
    if quick:
        results["browser_loss"] = {"skipped": "not run in --quick mode (minutes); run `python bench/browser_loss.py --quick` alone"}
    else:
        from bench.browser_loss import browser_loss

        results["browser_loss"] = await browser_loss(False, Server, log)
        if "skipped" in results["browser_loss"]:
            log(f"  skipped: {results['browser_loss']['skipped']}")
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    return results


def summary(r: dict) -> dict:
    lat = r["latency"]
    pick = lambda d: {k: d[k] for k in ("p50", "p95", "p99")}  # noqa: E731
    cap = r["capacity"]
    at = next((s for s in reversed(cap["steps"]) if not s["fell_behind"]), cap["steps"][0])
    return {
        "uplink_ms": pick(lat["uplink_ms"]), "downlink_ms": pick(lat["downlink_ms"]),
        "cpu_per_call": r["baseline"]["bridge"]["cpu_per_call"],
        "baseline_cpu_per_call": r["baseline"]["bare_aiortc_echo"]["cpu_per_call"],
        "cpu_ratio_vs_baseline": r["baseline"]["ratios"]["cpu_per_call"],
        "round_trip_p50_ms": r["baseline"]["bridge"]["round_trip_ms"]["p50"],
        "baseline_round_trip_p50_ms": r["baseline"]["bare_aiortc_echo"]["round_trip_ms"]["p50"],
        "max_calls": cap["max_calls"], "max_calls_tested": cap["steps"][-1]["calls"],
        "max_calls_2_workers": (r.get("capacity_2_workers") or {}).get("max_calls"),
        "rss_per_call_mb": at["rss_per_call_mb"],
        "rss_growth_per_cycle_kb": r["memory"]["rss_growth_per_cycle_kb"],
        "loss_uplink_p95_ms": {str(int(x["loss_pct"])): x["uplink_ms"]["p95"] for x in r["loss"]["levels"]},
        "quick": r["quick"], "elapsed_s": r["elapsed_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced run, under 60 s")
    ap.add_argument("--no-report", action="store_true", help="do not rewrite BENCHMARKS.md and plots")
    args = ap.parse_args()
    results = asyncio.run(run(args.quick))
    results["summary"] = summary(results)
    name = "run_quick" if args.quick else "run_full"
    path = write_result(name, results)
    log(f"results: {path}")
    if not args.no_report and not args.quick:
        # BENCHMARKS.md, the plots and README's figures come from full runs only: a quick
        # run writes nothing but bench/results/run_quick.json.
        from bench.report import update_readme, write_report

        log(f"report: {write_report(json.loads(path.read_text()))}")
        update_readme(json.loads(path.read_text()))
    print(json.dumps(results["summary"]))


if __name__ == "__main__":
    main()
