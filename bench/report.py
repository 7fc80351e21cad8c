"""Turns a bench/run.py result into BENCHMARKS.md and PNG plots (bench/plots/).
Every number comes from the result file; nothing is typed in by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS as RESULTS_DIR, ROOT  # noqa: E402

PLOTS = ROOT / "bench" / "plots"


def _cdf(ax, values, label):
    v = np.sort(np.asarray(values, dtype=float))
    if v.size:
        ax.plot(v, np.arange(1, v.size + 1) / v.size, label=label)


def plots(r: dict) -> dict[str, str]:
    PLOTS.mkdir(parents=True, exist_ok=True)
    out = {}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    _cdf(ax, r["latency"]["uplink_samples"], "uplink (caller encoder → upstream PCM)")
    _cdf(ax, r["latency"]["downlink_samples"], "downlink (upstream delta → caller decoded)")
    ax.set_xlabel("ms"); ax.set_ylabel("fraction"); ax.set_title("Latency, one call (no loss)"); ax.grid(alpha=.3); ax.legend(fontsize=8)
    fig.tight_layout(); fig.savefig(PLOTS / "latency_cdf.png", dpi=110); plt.close(fig)
    out["latency"] = "bench/plots/latency_cdf.png"

    steps = r["capacity"]["steps"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    n = [s["calls"] for s in steps]
    ax.plot(n, [s["cpu_per_call"] * 100 for s in steps], "o-", label="server CPU per call (% of a core)")
    ax.plot(n, [s["loop_lag_ms"]["p99"] for s in steps], "s-", label="event-loop lag p99 (ms)")
    ax.plot(n, [s["playback_lateness_ms"]["p99"] for s in steps], "^-", label="outbound frame lateness p99 (ms)")
    ax.plot(n, [s["uplink_ms"]["p95"] or 0 for s in steps], "d-", label="uplink p95 (ms)")
    ax.set_xlabel("concurrent full-duplex calls"); ax.set_title("Capacity, one process"); ax.grid(alpha=.3); ax.legend(fontsize=7)
    fig.tight_layout(); fig.savefig(PLOTS / "capacity.png", dpi=110); plt.close(fig)
    out["capacity"] = "bench/plots/capacity.png"

    levels = r["loss"]["levels"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    loss = [x["loss_pct"] for x in levels]
    axes[0].plot(loss, [x["uplink_ms"]["p50"] or 0 for x in levels], "o-", label="uplink p50")
    axes[0].plot(loss, [x["uplink_ms"]["p95"] or 0 for x in levels], "o--", label="uplink p95")
    axes[0].plot(loss, [x["downlink_ms"]["p50"] or 0 for x in levels], "s-", label="downlink p50")
    axes[0].set_xlabel("packet loss %"); axes[0].set_ylabel("ms"); axes[0].set_title("Latency under loss"); axes[0].grid(alpha=.3); axes[0].legend(fontsize=8)
    axes[1].plot(loss, [x["uplink_gaps_per_min"] for x in levels], "o-", label="uplink gaps ≥60 ms /min")
    axes[1].plot(loss, [x["downlink_gaps_per_min"] for x in levels], "s-", label="downlink gaps ≥60 ms /min")
    axes[1].set_xlabel("packet loss %"); axes[1].set_title("Audio gaps"); axes[1].grid(alpha=.3); axes[1].legend(fontsize=8)
    fig.tight_layout(); fig.savefig(PLOTS / "loss.png", dpi=110); plt.close(fig)
    out["loss"] = "bench/plots/loss.png"

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for x in levels:
        series = x["uplink_series"]
        if series:
            ax.plot([t for t, _ in series], [v for _, v in series], ".-", ms=3, label=f"{x['loss_pct']:.0f}% loss")
    ax.set_xlabel("seconds into the call"); ax.set_ylabel("uplink ms"); ax.set_title("Uplink latency over time (ratchet?)")
    ax.grid(alpha=.3); ax.legend(fontsize=7)
    fig.tight_layout(); fig.savefig(PLOTS / "loss_over_time.png", dpi=110); plt.close(fig)
    out["loss_time"] = "bench/plots/loss_over_time.png"
    return out


def _capacity_table(steps: list[dict], per_worker_detail: bool) -> list[str]:
    """The capacity ramp as a table; the one-process table also shows lag spread, RSS/call and threads."""
    if per_worker_detail:
        head = ("| calls | server cores | per call | loop lag p50/p99/max ms | frame lateness p99 ms | mic frames lost | "
                "uplink p95 ms | RSS MB | RSS/call MB | threads | behind? |")
    else:
        head = ("| calls | server cores | per call | loop lag p99 ms (worst worker) | frame lateness p99 ms | mic frames lost | "
                "uplink p95 ms | RSS MB | behind? |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for x in steps:
        lag = x["loop_lag_ms"]
        lag_cell = f"{lag['p50']}/{lag['p99']}/{lag['max']}" if per_worker_detail else f"{lag['p99']}"
        tail = f"{x['rss_mb']} | {x['rss_per_call_mb']} | {x['threads']}" if per_worker_detail else f"{x['rss_mb']}"
        rows.append(f"| {x['calls']} | {x['cpu_cores']} | {x['cpu_per_call']} | {lag_cell} | "
                    f"{x['playback_lateness_ms']['p99']} | {x['mic_lost_frames']} | {x['uplink_ms']['p95']} | "
                    f"{tail} | {'yes' if x['fell_behind'] else 'no'} |")
    return rows


def _loss_table(levels: list[dict], with_downlink: bool) -> list[str]:
    if with_downlink:
        head = ("| loss % | uplink p50/p95/p99/max | uplink p50 1st half → 2nd half | downlink p50/p95/p99/max | "
                "gaps ≥60 ms per min up / down | markers lost up / down (of sent) |")
    else:
        head = ("| loss % | uplink p50/p95/p99/max | uplink p50 1st half → 2nd half | gaps ≥60 ms per min up | "
                "markers lost up (of sent) |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for x in levels:
        down = f"{_p(x['downlink_ms'])} | " if with_downlink else ""
        gaps = f"{x['uplink_gaps_per_min']} / {x['downlink_gaps_per_min']}" if with_downlink else f"{x['uplink_gaps_per_min']}"
        lost = (f"{x['uplink_markers_lost']} / {x['downlink_markers_lost']}" if with_downlink
                else f"{x['uplink_markers_lost']}")
        rows.append(f"| {x['loss_pct']:.0f} | {_p(x['uplink_ms'])} | {x['uplink_first_half_ms']['p50']} → "
                    f"{x['uplink_second_half_ms']['p50']} | {down}{gaps} | {lost} (of {x['markers_sent']}) |")
    return rows


def _refusal(cap: dict) -> list[str]:
    """Why the ramp stopped, when it stopped before any step fell behind."""
    steps = cap["steps"]
    if not steps or steps[-1]["fell_behind"]:
        return []
    refused = cap.get("refused")
    if refused:
        return ["", f"The ramp stopped at {refused['calls']} calls: the server refused the next offer "
                f"(load-aware admission, `signaling/admission.py`): {refused['reason']}"]
    return ["", "The ramp stopped before any step fell behind: the server refused the next offer with 503 "
            "(load-aware admission, `signaling/admission.py`; the reason is in the run's log)."]


def _p(d: dict | None) -> str:
    if not d or d.get("p50") is None:
        return "—"
    return f"{d['p50']} / {d['p95']} / {d['p99']} / {d['max']}"


def write_report(r: dict) -> Path:
    pics = plots(r)
    m = r["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/report.py` from a run of `bench/run.py`; no figure here is typed by hand.",
        "",
        f"- date: {r['date']}",
        f"- machine: {m['cores']} cores, {m['cpu']}, Python {m['python']}, kernel {m['kernel']}",
        f"- command: `{r['command']}` ({'quick' if r['quick'] else 'full'} run, {r['elapsed_s']} s)",
        "- the server under test and the bare-aiortc baseline run in their own processes (CPU/RSS from /proc);",
        "  callers are aiortc peers sending real Opus in 20 ms frames; the upstream answers instantly (bench/upstream.py).",
        "- distributions are p50 / p95 / p99 / max in ms.",
        "",
        "## 1. Latency, one call (no loss)",
        "",
        "| path | p50 / p95 / p99 / max (ms) | markers |",
        "|---|---|---|",
        f"| uplink: caller hands a marker frame to its encoder → upstream has it as 24 kHz PCM | {_p(r['latency']['uplink_ms'])} | {r['latency']['uplink_ms']['n']} (lost {r['latency']['uplink_lost']}) |",
        f"| downlink: upstream sends a marker delta → caller's decoded audio has it | {_p(r['latency']['downlink_ms'])} | {r['latency']['downlink_ms']['n']} (lost {r['latency']['downlink_lost']}) |",
        "",
        f"{r['latency'].get('runs', 1)} call(s) of {r['latency']['seconds']} s; p50 of each call: uplink "
        f"{r['latency'].get('spread', {}).get('uplink_p50')}, downlink {r['latency'].get('spread', {}).get('downlink_p50')}. "
        "Uplink passes this bridge's receive buffer (media/jitter.py: packets released in order at once); downlink "
        "ends in the bench caller's aiortc jitter buffer (≈80 ms fixed prefetch), standing in for the browser's.",
        "",
        f"![latency]({pics['latency']})",
        "",
        "## 2. Capacity (one process, full-duplex calls: markers up, continuous model audio down)",
        "",
        f"Criteria: {r['capacity']['criteria']}. **Highest sustainable count: {r['capacity']['max_calls']}** "
        f"(of {r['capacity']['steps'][-1]['calls']} tried). Clients run on the same 2 cores, so their CPU competes with the server's.",
        "",
        *_capacity_table(r["capacity"]["steps"], per_worker_detail=True),
        *_refusal(r["capacity"]),
    ]
    two = r.get("capacity_2_workers")
    if two:
        lines += ["", f"The same ramp against `server.py --workers 2` (two processes on the port; CPU, RSS and threads "
                  f"summed over both): **highest sustainable count {two['max_calls']}**.", "",
                  *_capacity_table(two["steps"], per_worker_detail=False), *_refusal(two)]
    else:
        lines += ["", "The `--workers 2` ramp runs in the full suite only."]
    mem = r["memory"]
    lines += [
        "",
        "",
        f"![capacity]({pics['capacity']})",
        "",
        "## 3. Memory",
        "",
        f"RSS per call at steady state: see the capacity table (RSS/call). {mem['cycles']} sequential connect → hang-up cycles "
        f"({mem['seconds']} s):",
        "",
        "| | RSS MB | open fds | threads |",
        "|---|---|---|---|",
        f"| before | {mem['before']['rss_mb']:.1f} | {mem['before']['fds']} | {mem['before']['threads']} |",
        f"| after | {mem['after']['rss_mb']:.1f} | {mem['after']['fds']} | {mem['after']['threads']} |",
        "",
        f"RSS growth {mem['rss_growth_per_cycle_kb']} KB per cycle; active calls after: {mem['active_calls_after']}.",
        "",
        "## 4. Lossy networks",
        "",
        f"Impairment: {r['loss']['impairment']}; {r['loss']['seconds_per_level']} s per level. "
        "The impairment's jitter delays each packet by 0–60 ms (≈30 ms on average), so every latency here includes "
        "that network delay. Downlink carries continuous model audio sent 60 ms ahead of real time (its latency includes "
        "that queue) and is received by the bench caller's own aiortc jitter buffer, which stands in for the browser's: "
        "a browser's NetEq conceals loss far better, so downlink gaps and lost markers are the pessimistic side.",
        "",
        *_loss_table(r["loss"]["levels"], with_downlink=True),
    ]
    old = r.get("loss_aiortc_buffer")
    if old:
        lines += ["", f"The same bridge on aiortc's stock audio path (`--audio-path aiortc`: its jitter buffer, decoder and encoder), same run, "
                  f"{old['seconds_per_level']} s per level:", "", *_loss_table(old["levels"], with_downlink=False)]
    b = r["baseline"]
    lines += [
        "",
        f"![loss]({pics['loss']})",
        f"![loss over time]({pics['loss_time']})",
        "",
        "## 5. Baseline: bare aiortc echo peer, same clients, same run",
        "",
        f"{b['bridge']['calls']} full-duplex calls each. The bridge's upstream echoes every append back as a delta, so both "
        "paths carry audio both ways; round trip = caller marker → back in the caller's decoded audio. The round trip "
        "includes the bench caller's own aiortc jitter buffer and the phase of the echoed stream against the playback "
        "clock (a standing queue of 0–3 frames), so it moves between runs; p50 of each repeat: bridge "
        f"{b['bridge'].get('round_trip_p50_runs', 'n/a')}, bare {b['bare_aiortc_echo'].get('round_trip_p50_runs', 'n/a')}.",
        "",
        "| | CPU per call (cores, median; every run) | round trip p50/p95/p99/max ms | RSS MB |",
        "|---|---|---|---|",
        f"| this bridge | {b['bridge']['cpu_per_call']}; {b['bridge'].get('cpu_per_call_runs')} | {_p(b['bridge']['round_trip_ms'])} | {b['bridge']['rss_mb']} |",
        f"| bare aiortc echo | {b['bare_aiortc_echo']['cpu_per_call']}; {b['bare_aiortc_echo'].get('cpu_per_call_runs')} | {_p(b['bare_aiortc_echo']['round_trip_ms'])} | {b['bare_aiortc_echo']['rss_mb']} |",
        f"| ratio | {b['ratios']['cpu_per_call']}× | {b['ratios']['round_trip_p50']}× (p50) | |",
        "",
        "## 6. The design we replace: PCM over a WebSocket (TCP) vs our RTP path, same loss",
        "",
    ]
    rel = r["relay_vs_rtp"]
    if "skipped" in rel or "refused" in rel:
        lines.append(f"Not measured in this run: {rel.get('skipped') or rel.get('refused')}")
    else:
        lines += [rel.get("setup", ""), "",
                  "Read with care: this veth link has no propagation delay (the kernel here has no netem), so TCP "
                  "recovers a lost segment within about one frame; on a mobile path with a 50–100 ms round trip every "
                  "recovery costs at least that, and the WebSocket figures here are its best case. The RTP path's p95 "
                  "under loss is the receive buffer's 40 ms wait for a missing packet (`REORDER_WAIT_MS`); markers lost "
                  "on RTP are packets that never arrived (concealed as silence), where TCP would have stalled instead.", "",
                  "| loss % | path | latency p50/p95/p99/max ms | stalls ≥200 ms per min | markers lost |", "|---|---|---|---|---|"]
        for row in rel["rows"]:
            lines.append(f"| {row['loss_pct']:.0f} | {row['path']} | {_p(row['latency_ms'])} | {row['stalls_per_min']} | {row['lost']} |")
    lines += ["", *_browser_section(r.get("browser_loss") or {"skipped": "not part of this run"})]
    lines += ["", *admission_section(), "", *reconnect_section(), "", *cluster_section(), "", *voice_to_voice_section(), "",
              *echo_guard_section(), "", *browser_playout_section()]
    path = ROOT / "BENCHMARKS.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def browser_rows(b: dict, direction: str) -> dict[tuple[int, str], dict]:
    return {(row["loss_pct"], row["path"]): row for row in b.get("runs", [])
            if row["direction"] == direction or (row["loss_pct"] == 0 and direction == "downlink")}


def _browser_section(b: dict) -> list[str]:
    lines = ["## 7. A real browser under real loss: our Opus path against aiortc's stock one", ""]
    if "skipped" in b:
        return lines + [f"Not measured in this run: {b['skipped']}"]
    src = b["source"]
    lines += [
        f"Debian's Chromium, headless, in its own network namespace; its microphone a {src['seconds']} s file of "
        f"{len(src['sentences'])} sentences spoken by {src.get('voice', 'Piper (the bundled en_US-joe voice)')}, looped; the bundled page against `server.py`. {b['loss']}, "
        f"switched on after the call connected, {b['seconds_per_run']} s per run. **ours** = `--audio-path libopus` "
        "(answer asks for in-band FEC and RED; holes rebuilt from RED, then FEC, then libopus concealment; "
        "24 kHz mono encoder with FEC sized from Chromium's receiver reports, RED toward it); **stock** = "
        "`--audio-path aiortc` (aiortc's jitter buffer and PyAV decoder, lost audio becomes silence; its 96 kb/s CELT "
        "encoder, no FEC, no RED). Both in the same run.",
        "",
        "### Uplink: what the model receives",
        "",
        "Shares of all 20 ms frames the browser sent (server counters). Quality: sentence by sentence, each aligned "
        "against the clean source at 16 kHz: PESQ wideband (P.862.2) and STOI medians, gaps of digital silence "
        f"≥ 60 ms inside speech, word error rate of the local backend's recogniser (on the clean source it scores "
        f"{b.get('wer_clean_source')}). Hold = how long the receive buffer kept packets back waiting for a missing "
        "one (recent packets, p95).",
        "",
        "| loss % | path | frames lost | exact (received or RED) | rebuilt from RED / FEC | concealed | silence "
        "| lost frames recovered (RED+FEC) | PESQ-WB | STOI | WER | gaps ≥60 ms | hold p95 ms | browser B/packet |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (loss, path), row in sorted(browser_rows(b, "uplink").items(), key=lambda kv: (kv[0][0], kv[0][1] != "libopus")):
        if row["direction"] != "uplink":
            continue
        u, m = row["uplink"], row.get("model_audio", {})
        lines.append(
            f"| {loss} | {'ours' if path == 'libopus' else 'stock'} | {u['lost']} of {u['frames']} | {_pct(u['exact'])} | "
            f"{_pct(u['red'])} / {_pct(u['fec'])} | {_pct(u['concealed'])} | {_pct(u['silence'])} | "
            f"{_pct(u['recovered_of_lost'])} | {m.get('pesq_wb')} | {m.get('stoi')} | {m.get('wer')} | "
            f"{m.get('gaps_60ms')} | {(row.get('uplink_hold_ms') or {}).get('p95')} | "
            f"{row['browser_uplink']['bytes_per_packet']} |")
    lines += [
        "",
        "### Downlink: what Chromium hears",
        "",
        "Chromium's own `inbound-rtp` stats over the lossy period (the 0 % row is the uplink-only run, where the "
        "downlink was clean). `fecPacketsReceived` counts the redundancy Chromium got (RED blocks and FEC).",
        "",
        "| loss % | path | packets lost | concealed samples | FEC/RED packets received | jitter buffer delay ms | bytes received |",
        "|---|---|---|---|---|---|---|",
    ]
    for (loss, path), row in sorted(browser_rows(b, "downlink").items(), key=lambda kv: (kv[0][0], kv[0][1] != "libopus")):
        if row["direction"] != "downlink" and loss != 0:
            continue
        d = row["downlink"]
        lines.append(f"| {loss} | {'ours' if path == 'libopus' else 'stock'} | {d['packets_lost']} | "
                     f"{_pct(d['concealed_ratio'])} | {d['fec_packets_received']} | {d['jitter_buffer_ms']} | "
                     f"{d['bytes_received']} |")
    cpu = b.get("cpu") or {}
    if cpu:
        lines += ["", "### CPU", "",
                  f"{cpu['calls']} browser calls at once (full duplex: continuous speech up, continuous model audio "
                  f"down), {cpu['seconds']} s, interleaved repeats: this bridge {cpu['bridge_cpu_per_call']} cores per "
                  f"call {cpu['bridge_runs']}, bare aiortc echo peer {cpu['bare_aiortc_echo_cpu_per_call']} "
                  f"{cpu['echo_runs']}: **{cpu['ratio']}×**."]
    return lines


def local_backend_lines(lb: dict) -> list[str]:
    """README lines for `bench/local_backend.py`'s result (Whisper beside pocketsphinx, same run)."""
    engines = lb.get("engines")
    if not engines:
        return []
    n = lb["concurrent"]
    rows = [f"Local backend (`{lb['command']}`, {lb['date']}; {lb['sentences']} held-out sentences spoken to the "
            "bridge by an aiortc caller, captions scored; latency over the backend's WebSocket):", "",
            "| recogniser | word error rate, Piper voice / espeak-ng voice | `speech_stopped` → first audio p50 / p95, "
            f"1 session | p50 / p95, {n} at once | RSS of the backend (model workers) |",
            "|---|---|---|---|---|"]
    for name, e in engines.items():
        label = "Whisper tiny.en (default)" if name == "whisper" else "pocketsphinx (before)"
        one, many, rss = e["one_session_ms"], e[f"{n}_sessions_ms"], e["rss"]
        rows.append(f"| {label} | {e['bridge']['piper']['wer']} / {e['bridge']['espeak']['wer']} | "
                    f"{one['p50']} / {one['p95']} ms | {many['p50']} / {many['p95']} ms | "
                    f"{rss['total_mb']} MB ({rss['workers']} workers: {', '.join(map(str, rss['per_worker_mb']))} MB) |")
    return rows


def browser_headline(b: dict) -> list[str]:
    """README lines for section 7: what loss does to what the model and the browser get."""
    rows = ["Real Chromium through nftables loss in a network namespace (`bench/browser_loss.py`, BENCHMARKS.md §7), "
            "ours against aiortc's stock audio path in the same run:", "",
            "| loss | uplink: lost frames rebuilt from RED/FEC (rest concealed) | uplink PESQ-WB / STOI, ours vs stock "
            "| downlink: Chromium's concealed samples, ours vs stock |", "|---|---|---|---|"]
    up, down = browser_rows(b, "uplink"), browser_rows(b, "downlink")
    for loss in b["levels"]:
        ours, stock = up.get((loss, "libopus")), up.get((loss, "aiortc"))
        dours, dstock = down.get((loss, "libopus")), down.get((loss, "aiortc"))
        if not ours:
            continue
        m, ms = ours.get("model_audio", {}), (stock or {}).get("model_audio", {})
        rows.append(f"| {loss} % | {_pct(ours['uplink']['recovered_of_lost'])} | {m.get('pesq_wb')} / {m.get('stoi')} vs "
                    f"{ms.get('pesq_wb')} / {ms.get('stoi')} | "
                    f"{_pct((dours or {}).get('downlink', {}).get('concealed_ratio'))} vs "
                    f"{_pct((dstock or {}).get('downlink', {}).get('concealed_ratio'))} |")
    cpu = b.get("cpu") or {}
    if cpu:
        rows += ["", f"CPU per browser call: {cpu['bridge_cpu_per_call']} cores, bare aiortc echo peer "
                 f"{cpu['bare_aiortc_echo_cpu_per_call']} ({cpu['ratio']}×)."]
    return rows


def _result(name: str) -> dict | None:
    """A section's own result file (bench/results/<name>.json), if it has been run."""
    import json

    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def admission_section() -> list[str]:
    """Section 8, from bench/admission.py's own result file (a separate run)."""
    lines = ["## 8. Load-aware admission at twice its threshold, and silent connections", ""]
    a = _result("admission")
    if a is None:
        return lines + ["Not measured yet: run `python bench/admission.py`."]
    lines += [f"From `{a['command']}` on {a['date']}. One analysed probe call, then cheap full-duplex calls offered one a "
              "second until the first 503; then clients keep offering until twice that many are asked for (refused ones "
              f"retry every 0.5 s), and the probe is measured over {a['seconds_per_phase']:g} s. The baseline is the same "
              "offered load against `--admission false` (MAX_CALLS at the doubled load). Marker latency, p50/p95/p99/max "
              "ms; clients share the server's 2 cores.", "",
              "| server | threshold | offered / admitted | uplink unloaded → at 2× | downlink unloaded → at 2× | "
              "ratio to unloaded, p50 up / down | frames late p95 | loop lag p95, server / clients | server CPU |",
              "|---|---|---|---|---|---|---|---|---|"]
    for key, label in (("admission", "admission on (default)"), ("no_admission", "admission off")):
        x = a[key]
        u, l, ratio = x["unloaded"], x["loaded_2x"], x["ratio_to_unloaded"]
        lines.append(f"| {label} | {x['threshold_calls']} calls | {l['offered_calls']} / {l['admitted_calls']} | "
                     f"{_p(u['uplink_ms'])} → {_p(l['uplink_ms'])} | {_p(u['downlink_ms'])} → {_p(l['downlink_ms'])} | "
                     f"{ratio['uplink_ms_p50']}× / {ratio['downlink_ms_p50']}× | {l['lateness_ms']['p95']} ms | "
                     f"{l['loop_lag_ms']['p95']} / {(l.get('client_loop_lag_ms') or {}).get('p95')} ms | "
                     f"{l['cpu_cores']} cores |")
    refusal = a["admission"].get("refusal") or {}
    if refusal.get("reason"):
        lines += ["", f"The first refusal: `{refusal['reason'][:260]}`"]
    idle = a.get("idle_connections")
    if idle:
        lines += ["", f"Silent connections: {idle['connections_opened']} TCP connections that never send a byte, against "
                  f"`--max-connections {idle['server_cap']}`: the server held {idle['server_open_connections']} "
                  f"(evicted {idle['evicted']} idle ones to make room), its fds went {idle['server_fds_before']} → "
                  f"{idle['server_fds_during']}, `/healthz` answered in {_p(idle['healthz_ms'])} ms meanwhile, a call "
                  f"{'connected' if idle['call_connected'] else 'was refused'}, and the log grew by {idle['log_bytes']} bytes."]
    return lines


def reconnect_section() -> list[str]:
    lines = ["## 9. A network change: how soon audio flows again", ""]
    r = _result("reconnect")
    if r is None or "skipped" in r:
        return lines + [f"Not measured: {(r or {}).get('skipped', 'run `sudo python bench/reconnect.py`')}."]
    lines += [f"From `{r['command']}` on {r['date']}. Chromium (the bundled page) in a network namespace; each of "
              f"{len(r['trials'])} trials drops all its UDP for {r['outage_s']:g} s and changes its address halfway "
              "(its ICE candidates die), then restores the link. Seconds from the restore until the re-attached peer "
              "is connected, the caller's audio reaches the model, and model audio (a reply started at the restore) "
              f"plays in the page; {r['upstream_sessions']} upstream session throughout.", "",
              "| measure | p50 | p95 | max |", "|---|---|---|---|"]
    for key, label in (("page_connected_s", "page's new peer connected"), ("uplink_s", "caller's audio at the model"),
                       ("downlink_s", "model audio playing in the page")):
        d = r[key]
        lines.append(f"| {label} | {d['p50']} s | {d['p95']} s | {d['max']} s |")
    return lines


def cluster_section() -> list[str]:
    lines = ["## 10. A cluster on this machine: calls sustained by 1, 2 and 3 nodes, and what forwarding adds", ""]
    c = _result("cluster")
    if c is None:
        return lines + ["Not measured yet: run `sudo python bench/cluster.py`."]
    sig = c["signaling_ms"]
    lines += [f"From `{c['command']}` on {c['date']}. Nodes are `server.py --redis-url` in network namespaces with a real "
              "redis-server; the upstream answers at once; callers are cheap full-duplex aiortc peers in the benchmark "
              "process, pinned to CPU 0 (the nodes may use both cores).", "",
              "Signaling: the round trip of an offer (SDP answer and upstream set up), made on the node it reached or "
              "placed by it on another node (forwarded, the answer relayed); ms.", "",
              "| offer | n | p50 | p95 | p99 | max |", "|---|---|---|---|---|---|"]
    for way in ("direct", "forwarded"):
        d = sig[way]
        lines.append(f"| {way} | {d['n']} | {d['p50']} | {d['p95']} | {d['p99']} | {d['max']} |")
    adds = sig["forwarding_adds_ms"]
    lines += ["", f"Forwarding adds **{adds.get('p50')} ms** at p50 and {adds.get('p99')} ms at p99.", "",
              "Capacity: cheap calls offered to node 0, one a second, until the cluster first refuses one (every node's "
              "admission says it is loaded); then held 10 s.", "",
              "| nodes | calls admitted | spread | connected 10 s later | node CPU (cores) | machine busy | why each node refused |",
              "|---|---|---|---|---|---|---|"]
    for x in c["capacity"]:
        why = "; ".join(f"{k}: {v.removeprefix('Not taking calls: ')}" for k, v in x["nodes_at_the_end"].items())
        lines.append(f"| {x['nodes']} | {x['admitted_calls']} | {', '.join(f'{k} {v}' for k, v in x['spread'].items())} | "
                     f"{x['still_connected_10s_later']} | {' + '.join(str(v) for v in x['node_cores_while_held'])} | "
                     f"{x['machine_busy_cores_while_held']} of {x['machine_cores']} | {why} |")
    return lines


def _hops(summary: dict) -> str:
    from bench.voice_to_voice import HOPS

    return " + ".join(f"{(summary.get(h + '_ms') or {}).get('p50')}" for h in HOPS)


def voice_to_voice_section() -> list[str]:
    """Section 11, from bench/voice_to_voice.py (aiortc caller) and bench/voice_to_voice_browser.py (Chromium)."""
    lines = ["## 11. Voice to voice: the end of what was said → the first sound of the answer", ""]
    a, b = _result("voice_to_voice"), _result("voice_to_voice_browser")
    if a is None and b is None:
        return lines + ["Not measured yet: run `python bench/voice_to_voice.py` and `python bench/voice_to_voice_browser.py`."]
    lines += ["Each sentence's end of speech (its last 5 ms above -40 dBFS as the caller sent it) to the first audible "
              "5 ms of the answer as the caller plays it; the embedded local backend (Whisper tiny.en, the echo "
              "responder, Piper), no key. Hops (p50 each, from the `oai-events` events on the same clock): turn end "
              "(→ `speech_stopped`) + recognition (→ transcription completed) + responder (→ first transcript delta) "
              "+ synthesis and playback start (→ `output_audio_buffer.started`) + downlink and playout (→ first audible). "
              "Cut-ins: answers that start inside a sentence's 450 ms pause.", "",
              "| caller | setting | voice to voice p50 / p95 / p99 / max ms | hops p50 ms | cut-ins | Chromium jitter buffer / playout delay |",
              "|---|---|---|---|---|---|"]
    for run in (b or {}).get("runs", []):
        s = run["summary"]
        c = s.get("chromium") or {}
        lines.append(f"| Chromium (bundled page) | audio path {run['audio_path']} | {_p(s['voice_to_voice_ms'])} | {_hops(s)} | "
                     f"{s['cut_ins']} of {s['pauses']} | {c.get('jitter_buffer_ms')} / {c.get('playout_delay_ms')} ms |")
    for sc in (a or {}).get("scenarios", []):
        s = sc["summary"]
        lines.append(f"| aiortc caller | {sc['name']} | {_p(s['voice_to_voice_ms'])} | {_hops(s)} | "
                     f"{s['cut_ins']} of {s['pauses']} | |")
    for r in (x for x in (b, a) if x):
        lines.append("")
        lines.append(f"- `{r['command']}` on {r['date']}.")
    return lines


def voice_to_voice_headline() -> list[str]:
    a, b = _result("voice_to_voice"), _result("voice_to_voice_browser")
    rows = []
    if b and b.get("runs"):
        s = b["runs"][0]["summary"]
        rows.append(f"Voice to voice (`bench/voice_to_voice_browser.py`, BENCHMARKS.md §11, {b['date']}): in real Chromium "
                    f"with the bundled page and the local backend, the end of a sentence to the first sound of the answer "
                    f"is **{s['voice_to_voice_ms']['p50']} ms p50** ({s['voice_to_voice_ms']['p95']} ms p95, "
                    f"{s['voice_to_voice_ms']['n']} sentences; {s['cut_ins']} cut-ins in {s['pauses']} mid-sentence pauses).")
    if a and a.get("scenarios"):
        by = {sc["name"]: sc["summary"]["voice_to_voice_ms"] for sc in a["scenarios"]}
        now = by.get("local backend, defaults") or {}
        before = by.get("local backend, server_vad 500 ms (the previous default)")
        tail = f"; with server VAD's 500 ms silence instead of semantic VAD, {before['p50']} ms" if before else ""
        rows.append(f"Through an aiortc caller (`bench/voice_to_voice.py`, {a['date']}; its jitter buffer adds ≈80 ms): "
                    f"{now.get('p50')} ms p50, {now.get('p95')} ms p95{tail}.")
    return rows


def echo_guard_section() -> list[str]:
    """Section 12, from bench/echo_guard.py."""
    lines = ["## 12. Echo guard: a phone on speaker", ""]
    r = _result("echo_guard")
    if r is None:
        return lines + ["Not measured yet: run `python bench/echo_guard.py`."]
    e = r["echo"]
    lines += [f"An aiortc caller whose microphone hears what it plays {e['delay_ms']:g} ms later at {e['gain_db']:g} dB "
              f"through a simulated room ({e['room']}) with noise at {e['noise_dbfs']} dBFS, against the embedded local "
              "backend (its VAD decides barge-in). The model speaks long replies while the caller is silent; then the "
              "caller talks over it at a random point (speech onset → `output_audio_buffer.cleared`).", "",
              "| ECHO_GUARD | model speech | false barge-ins | echoed turns / words | double talk: onset → flushed p50 / p95 / max | missed | cut off by its echo first |",
              "|---|---|---|---|---|---|---|"]
    for x in r["end_to_end"]:
        d = x["double_talk"]
        f = d["speech_onset_to_flush_ms"]
        flush = f"{f['p50']} / {f['p95']} / {f['max']} ms" if f["n"] else "none: cut off by its echo before"
        lines.append(f"| {x['guard']} | {x['model_speech_s']} s | {x['false_barge_ins']} | {x['echoed_turns']} / "
                     f"{x['echoed_words']} | {flush} | {d['missed']} of {d['tries']} | "
                     f"{d['cut_off_by_its_echo_first']} |")
    c = r.get("canceller")
    if c:
        lines += ["", "The canceller alone (`media/echo.py` fed 20 ms at a time as a call feeds it; two Piper paragraphs "
                  "as the model, the same room): echo return loss enhancement after the first 2 s, time from the first "
                  "model audio until it holds 20 dB, CPU while it runs. ERLE here is everything in over everything out, "
                  "and the room's noise (-60 dBFS) is not echo and stays: at -20 dB the echo is only about 20 dB above "
                  "it, which bounds that row.", "",
                  "| delay | echo level | ERLE p50 | converged after | CPU |", "|---|---|---|---|---|"]
        for x in c["erle"]:
            lines.append(f"| {x['delay_ms']} ms | {x['gain_db']} dB | {x['erle_db_p50']} dB | {x['converged_s']} s | "
                         f"{x['cpu_core']} core |")
        j, d, n = c["delay_jump"], c["drift"], c["no_echo"]
        lines += ["", f"- Delay jump {j['delay_ms']} ms: 20 dB again after {j['reconverged_s']} s; ERLE p50 "
                  f"{j['erle_db_p50_after']} dB after.",
                  f"- Drifting delay {d['delay_ms']}: ERLE p50 {d['erle_db_p50']} dB.",
                  f"- No echo, the caller talking over the model all along (the worst case: a caller mostly talks "
                  f"while the model is silent, when nothing runs): PESQ-WB of what the model gets {n['pesq_wb_auto']} "
                  f"with `auto` against {n['pesq_wb_off']} with `off` over the whole clip; the call showed no echo after "
                  f"{n['cleared_after_s']} s of model speech; from {n['untouched_from_s']} s on the audio is the caller's bit "
                  f"for bit: {n['pesq_wb_auto_after_verdict']} against {n['pesq_wb_off_after_verdict']}, added latency "
                  f"{n['added_latency_ms_after_verdict']} ms ({n['added_latency_ms_before_verdict']} ms before the "
                  "verdict: the canceller's own delay). Before the verdict AEC3 is still in its cautious start and "
                  "turns a caller it cannot yet tell from echo down by 10-15 dB."]
    lines += ["", f"- `{r['command']}` on {r['date']}."]
    return lines


def echo_guard_headline() -> list[str]:
    r = _result("echo_guard")
    if r is None:
        return []
    by = {x["guard"]: x for x in r["end_to_end"]}
    on, off = by.get("auto"), by.get("off")
    if not on:
        return []
    f = on["double_talk"]["speech_onset_to_flush_ms"]
    e = r["echo"]
    row = (f"Echo guard (`bench/echo_guard.py`, BENCHMARKS.md §12, {r['date']}): a caller whose microphone hears its "
           f"speaker {e['delay_ms']:g} ms later at {e['gain_db']:g} dB in a reverberant room; over {on['model_speech_s']} s "
           f"of model speech, **{on['false_barge_ins']} false barge-ins and {on['echoed_words']} echoed words** with "
           f"`ECHO_GUARD=auto`")
    if off:
        row += (f" (`off`: the model cut itself off {off['false_barge_ins']} times in {off['model_speech_s']} s of "
                f"speech, {off['echoed_turns']} turns of its own words)")
    row += (f"; the caller talking over the model still stops it: speech onset → audio flushed {f['p50']} ms p50 "
            f"({f['p95']} ms p95), {on['double_talk']['missed']} of {on['double_talk']['tries']} missed.")
    return [row]


def browser_playout_section() -> list[str]:
    """Section 13, from bench/browser_playout.py."""
    lines = ["## 13. Browser playout: what each browser holds before it plays", ""]
    r = _result("browser_playout")
    if r is None:
        return lines + ["Not measured yet: run `python bench/browser_playout.py`."]
    lines += [f"The bundled page in each headless browser (Firefox with a private PulseAudio daemon as its sound card), "
              f"a stub upstream silent for {r['quiet_s']:g} s after the call connects, then a {r['answer_s']:g} s tone. "
              f"Jitter buffer: `jitterBufferDelay` / `jitterBufferEmittedCount` of each second (median of "
              f"{r['runs']} calls); first audible: the stub sending the answer → the page's level above 0.05.", "",
              "| browser | downlink in silence | jitter buffer, seconds 1-4 | jitter buffer at the end | answer first audible p50 / max |",
              "|---|---|---|---|---|"]
    for name, modes in r["browsers"].items():
        if "skipped" in modes:
            lines.append(f"| {name} | skipped: {modes['skipped']} | | | |")
            continue
        for mode, label in (("every_frame", "every 20 ms frame (`off`)"),
                            ("dtx_until_speech", "DTX until the model first speaks (`auto`)"),
                            ("dtx", "DTX throughout (`on`)")):
            m = modes.get(mode)
            if not m:
                continue
            by = m["jitter_buffer_ms_by_second_median"]
            first = " / ".join(f"{x:g}" for x in by[:4])
            a = m["answer_first_audible_ms"]
            lines.append(f"| {name} | {label} | {first} ms | {m['jitter_buffer_ms_last_answer_second_median']:g} ms | "
                         f"{a.get('p50')} / {a.get('max')} ms |")
    lines += ["", f"- `{r['command']}` on {r['date']}."]
    return lines


def browser_playout_headline() -> list[str]:
    r = _result("browser_playout")
    if r is None or "firefox" not in r["browsers"] or "skipped" in r["browsers"]["firefox"]:
        return []
    f = r["browsers"]["firefox"]
    c = r["browsers"].get("chromium", {})
    row = (f"Browser playout (`bench/browser_playout.py`, BENCHMARKS.md §13, {r['date']}): a call's first answer, "
           f"after {r['quiet_s']:g} s of silence, is first audible in Firefox after "
           f"{f['dtx_until_speech']['answer_first_audible_ms']['p50']} ms p50 with `OPUS_DTX=auto` (the default), "
           f"{f['every_frame']['answer_first_audible_ms']['p50']} ms when every silent frame is sent (Firefox holds "
           f"them until its playout starts)")
    if c and "skipped" not in c:
        row += (f"; in Chromium {c['dtx_until_speech']['answer_first_audible_ms']['p50']} ms and "
                f"{c['every_frame']['answer_first_audible_ms']['p50']} ms")
    return [row + "."]


def admission_headline() -> list[str]:
    a = _result("admission")
    if a is None:
        return []
    on, off = a["admission"], a["no_admission"]
    idle = a.get("idle_connections") or {}
    rows = [f"Load-aware admission (`bench/admission.py`, BENCHMARKS.md §8, {a['date']}): one process starts refusing at "
            f"**{on['threshold_calls']} calls** offered; at twice that offered, the admitted calls' latency against unloaded:", "",
            "| | uplink p50 / p95 | downlink p50 / p95 |", "|---|---|---|"]
    for x, label in ((on, "unloaded"), (on, f"admission on, {on['loaded_2x']['admitted_calls']} admitted"),
                     (off, f"admission off, {off['loaded_2x']['admitted_calls']} admitted")):
        d = x["unloaded"] if label == "unloaded" else x["loaded_2x"]
        rows.append(f"| {label} | {d['uplink_ms']['p50']} / {d['uplink_ms']['p95']} ms | "
                    f"{d['downlink_ms']['p50']} / {d['downlink_ms']['p95']} ms |")
    if idle:
        rows += ["", f"{idle['connections_opened']} silent TCP connections: the server held {idle['server_open_connections']} "
                 f"(its cap), `/healthz` p50 {idle['healthz_ms']['p50']} ms, and a call still connected."]
    return rows


def update_readme(r: dict) -> None:
    """Rewrite the figures block of README.md from this run (and the local-backend run, if any)."""
    import json

    s, base = r["summary"], r["baseline"]
    loss = {int(x["loss_pct"]): x for x in r["loss"]["levels"]}
    old = {int(x["loss_pct"]): x for x in (r.get("loss_aiortc_buffer") or {}).get("levels", [])}
    rows = [
        f"From `{r['command']}` on {r['date']} ({r['machine']['cores']} cores, {r['machine']['cpu']}):",
        "",
        "| figure | this bridge | reference in the same run |",
        "|---|---|---|",
        f"| uplink latency p50 / p95 / p99 (caller's encoder → model gets PCM) | {s['uplink_ms']['p50']} / {s['uplink_ms']['p95']} / {s['uplink_ms']['p99']} ms | |",
        f"| downlink latency p50 / p95 / p99 (model's delta → caller decoded) | {s['downlink_ms']['p50']} / {s['downlink_ms']['p95']} / {s['downlink_ms']['p99']} ms | includes the caller's aiortc jitter buffer (≈80 ms) |",
        f"| round trip p50, caller → model → caller | {s['round_trip_p50_ms']} ms | bare aiortc echo peer: {s['baseline_round_trip_p50_ms']} ms ({base['ratios']['round_trip_p50']}×) |",
        f"| server CPU per full-duplex call | {s['cpu_per_call']} cores | bare aiortc echo peer: {s['baseline_cpu_per_call']} cores ({s['cpu_ratio_vs_baseline']}×) |",
        f"| calls one process sustains (clients on the same 2 cores) | {s['max_calls']} | "
        f"{'with `--workers 2`: ' + str(s['max_calls_2_workers']) if s.get('max_calls_2_workers') else ''} |",
        f"| RSS growth over {r['memory']['cycles']} connect/hang-up cycles | {s['rss_growth_per_cycle_kb']} KB per cycle | |",
    ]
    for pct in (5, 20):
        if pct in loss:
            ref = f"aiortc's jitter buffer: {old[pct]['uplink_ms']['p95']} ms" if pct in old else ""
            rows.append(f"| uplink p95 at {pct} % bursty loss + ±30 ms jitter | {loss[pct]['uplink_ms']['p95']} ms | {ref} |")
    local = RESULTS_DIR / "local_backend.json"
    if local.exists():
        rows += ["", *local_backend_lines(json.loads(local.read_text()))]
    browser = r.get("browser_loss") or {}
    if browser.get("runs"):
        rows += ["", *browser_headline(browser)]
    v2v = voice_to_voice_headline()
    if v2v:
        rows += ["", *v2v]
    echo = echo_guard_headline()
    if echo:
        rows += ["", *echo]
    playout = browser_playout_headline()
    if playout:
        rows += ["", *playout]
    admission = admission_headline()
    if admission:
        rows += ["", *admission]
    rec = _result("reconnect")
    if rec and "skipped" not in rec:
        rows += ["", f"A network change (`bench/reconnect.py`, BENCHMARKS.md §9): with the page's UDP cut for "
                 f"{rec['outage_s']:g} s and its address changed, audio flows again {rec['uplink_s']['p50']} s (p50; p95 "
                 f"{rec['uplink_s']['p95']} s) after the network is back toward the model, "
                 f"{rec['downlink_s']['p50']} s (p95 {rec['downlink_s']['p95']} s) toward the page, on one upstream session."]
    cl = _result("cluster")
    if cl:
        caps = ", ".join(f"{x['nodes']} node{'s' if x['nodes'] > 1 else ''}: {x['admitted_calls']}" for x in cl["capacity"])
        adds = cl["signaling_ms"]["forwarding_adds_ms"]
        rows += ["", f"A cluster on this machine (`bench/cluster.py`, BENCHMARKS.md §10): an offer placed on another node "
                 f"costs {adds.get('p50')} ms more at p50 ({adds.get('p99')} ms at p99) than one made where it arrived; "
                 f"calls sustained: {caps} (two cores: the nodes refuse on event-loop lag from sharing them, with the "
                 "machine about half busy; see §10)."]
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- figures:start -->", "<!-- figures:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        readme.write_text(head + start + "\n" + "\n".join(rows) + "\n" + end + tail)


if __name__ == "__main__":
    # Re-render BENCHMARKS.md and README's figures from the stored full run (after a section
    # run on its own, e.g. bench/admission.py), without re-measuring.
    import json

    run = json.loads((RESULTS_DIR / "run_full.json").read_text())
    print(write_report(run))
    update_readme(run)
