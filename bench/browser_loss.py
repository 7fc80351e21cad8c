"""Section 7: a real browser under real packet loss, our Opus path against aiortc's stock one.

Debian's Chromium runs headless in its own network namespace (harness/netns.py),
its microphone a file of spoken sentences; it loads the bundled page from the real
`server.py`, which listens on this side of a veth. nftables drops a random share
of the UDP packets in one direction at a time (0, 5, 10, 20, 30 %), after the call
has connected. The upstream (bench/upstream.py) keeps every byte the model is
sent and streams continuous model audio back. Each level runs twice in the same
run: `--audio-path libopus` (ours: RED, in-band FEC, concealment, our encoder)
and `--audio-path aiortc` (aiortc's jitter buffer, PyAV decoder, its 96 kb/s
CELT encoder, an answer without FEC or RED).

Per run, uplink: what happened to each 20 ms frame (the server's counters:
received, rebuilt from RED, from FEC, concealed, left silent), how long the
receive buffer held packets back, and what the model got against the clean
source, sentence by sentence after alignment: PESQ wideband, STOI, gaps of
digital silence ≥ 60 ms inside speech, and the word error rate of the local
backend's recogniser (against the same recogniser on the clean source).
Downlink: Chromium's own `inbound-rtp` stats over the lossy period. Then CPU:
three browser calls on the bridge against three on a bare aiortc echo peer.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
import wave
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import ONE_ADDRESS, RESULTS, ProcStats  # noqa: E402
from bench.upstream import InstantUpstream  # noqa: E402
from harness.browser import answer_audio_lines, audio_stats, launch, start_call  # noqa: E402
from harness.netns import LossyLink  # noqa: E402
from harness.speech import speech_wav  # noqa: E402
from media.resample import StreamResampler  # noqa: E402

SENTENCES = [
    "Hello there, can you hear me clearly today?",
    "What is the weather like in London this afternoon?",
    "I would like to book a table for four people at seven.",
    "Please remind me to call my sister tomorrow morning.",
    "How far away is the moon from the earth?",
    "Thank you very much, that was really helpful.",
]
PAUSE_S = 0.5
SCORE_RATE = 16000
#: Gap of digital silence inside speech that counts as a dropout.
GAP_MS = 60


def make_source(folder: Path) -> tuple[Path, np.ndarray, list[tuple[int, int, str]]]:
    """The microphone file (48 kHz) and its sentences as (start, end, text) at SCORE_RATE."""
    pieces, spans, pos = [], [], 0
    for i, text in enumerate(SENTENCES):
        part = speech_wav(text, folder / f"s{i}.wav", rate=SCORE_RATE, pad_s=0.0)
        with wave.open(str(part)) as w:
            x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        x = x[int(0.45 * SCORE_RATE):]  # speech_wav puts 0.5 s before the speech
        nz = np.flatnonzero(np.abs(x) > 100)
        x = x[: nz[-1] + 1] if nz.size else x
        spans.append((pos, pos + x.size, text))
        pieces += [x, np.zeros(int(PAUSE_S * SCORE_RATE), dtype="<i2")]
        pos += x.size + int(PAUSE_S * SCORE_RATE)
    source = np.concatenate(pieces)
    mic = folder / "mic.wav"
    up = StreamResampler(48000).pcm(source.tobytes(), SCORE_RATE)
    with wave.open(str(mic), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(48000)
        w.writeframes(up.tobytes())
    return mic, source.astype(np.float64), spans


def _to16k(pcm24: bytes) -> np.ndarray:
    return StreamResampler(SCORE_RATE).pcm(pcm24, 24000).astype(np.float64)


def _offset(received: np.ndarray, source: np.ndarray) -> int:
    """Where the (looping) source starts in the received audio, modulo its length."""
    n = 1 << int(np.ceil(np.log2(received.size + source.size)))
    corr = np.fft.irfft(np.fft.rfft(received, n) * np.conj(np.fft.rfft(source, n)), n)
    lag = int(np.argmax(corr[: received.size]))
    return lag % source.size


def _refine(received: np.ndarray, ref: np.ndarray, at: int, search: int) -> int:
    lo, hi = max(0, at - search), min(received.size - ref.size, at + search)
    if hi <= lo:
        return at
    window = received[lo:hi + ref.size]
    corr = np.correlate(window, ref, "valid")
    return lo + int(np.argmax(corr))


def _zero_gaps(x: np.ndarray) -> int:
    """Runs of exact zeros of at least GAP_MS."""
    need = GAP_MS * SCORE_RATE // 1000
    zero = np.concatenate([[0], (x == 0).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(zero))
    return int(sum(1 for a, b in zip(edges[::2], edges[1::2]) if b - a >= need))


async def score(received24: bytes, source: np.ndarray, spans, transcriber) -> dict:
    """Sentence-aligned quality of what the model got, against the clean source."""
    from jiwer import wer
    from pesq import pesq
    from pystoi import stoi

    rec = _to16k(received24)
    if rec.size < source.size:
        return {"sentences": 0}
    base = _offset(rec, source)
    pesqs, stois, gaps, hyps, refs = [], [], 0, [], []
    for loop in range(-1, rec.size // source.size + 1):
        for start, end, text in spans:
            ref = source[start:end]
            at = base + loop * source.size + start
            if at < 0 or at + ref.size > rec.size:
                continue
            at = _refine(rec, ref, at, SCORE_RATE // 25)
            deg = rec[at:at + ref.size]
            try:
                pesqs.append(float(pesq(SCORE_RATE, ref, deg, "wb")))
            except Exception:  # PESQ refuses audio it finds no speech in
                pesqs.append(1.0)
            stois.append(float(stoi(ref, deg, SCORE_RATE)))
            gaps += _zero_gaps(deg)
            hyps.append(await transcriber.transcribe(deg.astype("<i2").tobytes()))
            refs.append(text)
    norm = lambda s: " ".join("".join(c for c in s.lower() if c.isalnum() or c == " ").split())  # noqa: E731
    return {"sentences": len(pesqs), "pesq_wb": _median(pesqs), "stoi": _median(stois, 3), "gaps_60ms": gaps,
            "wer": round(wer([norm(r) for r in refs], [norm(h) or "-" for h in hyps]), 3) if refs else None,
            "heard": hyps[:2]}


def _median(values: list[float], digits: int = 2) -> Optional[float]:
    return round(float(np.median(values)), digits) if values else None


async def _metrics(url: str) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/metrics.json?since=300") as r:
            return await r.json()


#: Readings, not counters: reported as they are at the end, never subtracted.
GAUGES = ("fec_loss_percent", "browser_fraction_lost")


def _diff(after: dict, before: dict) -> dict:
    return {k: v if k in GAUGES else round(v - before.get(k, 0), 4)
            for k, v in after.items() if isinstance(v, (int, float))}


def _uplink_shares(path: str, mic: dict) -> dict:
    """What became of each 20 ms frame the browser sent, in shares of all of them."""
    if path == "libopus":
        parts = {"received": mic.get("packets", 0), "red": mic.get("red_recovered", 0),
                 "fec": mic.get("fec_recovered", 0), "concealed": mic.get("concealed", 0),
                 "silence": mic.get("unfilled", 0)}
    else:  # aiortc's path: a lost frame is a gap MicPump fills with zeros
        parts = {"received": mic.get("packets", 0), "red": 0, "fec": 0, "concealed": 0,
                 "silence": mic.get("lost", 0)}
    total = max(1, sum(parts.values()))
    lost = parts["red"] + parts["fec"] + parts["concealed"] + parts["silence"]
    return {"frames": total, "lost": lost, **{k: round(v / total, 4) for k, v in parts.items()},
            "recovered_of_lost": round((parts["red"] + parts["fec"]) / lost, 3) if lost else None,
            "exact": round((parts["received"] + parts["red"]) / total, 4)}


def _browser_downlink(before: dict, after: dict) -> dict:
    a, b = after.get("inbound-rtp", {}), before.get("inbound-rtp", {})
    d = lambda k: (a.get(k) or 0) - (b.get(k) or 0)  # noqa: E731
    samples = d("totalSamplesReceived")
    return {"packets_received": d("packetsReceived"), "packets_lost": d("packetsLost"),
            "concealed_ratio": round(d("concealedSamples") / samples, 4) if samples else None,
            "fec_packets_received": d("fecPacketsReceived"), "fec_packets_discarded": d("fecPacketsDiscarded"),
            "jitter_buffer_ms": round(1000 * d("jitterBufferDelay") / d("jitterBufferEmittedCount"), 1)
            if d("jitterBufferEmittedCount") else None,
            "bytes_received": d("bytesReceived")}


def _browser_uplink(before: dict, after: dict) -> dict:
    """What Chromium's encoder sent while the loss was on (it adapts to our receiver reports)."""
    a, b = after.get("outbound-rtp", {}), before.get("outbound-rtp", {})
    packets = (a.get("packetsSent") or 0) - (b.get("packetsSent") or 0)
    sent = (a.get("bytesSent") or 0) - (b.get("bytesSent") or 0)
    return {"packets_sent": packets, "bytes_per_packet": round(sent / packets, 1) if packets else None,
            "target_bitrate": a.get("targetBitrate"),
            "reported_fraction_lost": (after.get("remote-inbound-rtp") or {}).get("fractionLost")}


async def one_run(browser, url: str, up: InstantUpstream, link: LossyLink, path: str, direction: str, loss: int,
                  seconds: float, source, spans, transcriber) -> dict:
    link.set_loss(0, 0)
    sessions = len(up.sessions)
    page = await start_call(browser, url)
    for _ in range(200):
        if len(up.sessions) > sessions:
            break
        await asyncio.sleep(0.05)
    session = up.sessions[-1]
    await asyncio.sleep(1.0)  # let the browser's encoder settle
    m0, s0, start = await _metrics(url), await audio_stats(page), len(session.pcm)
    link.set_loss(loss if direction == "uplink" else 0, loss if direction == "downlink" else 0)
    await asyncio.sleep(seconds)
    m1, s1 = await _metrics(url), await audio_stats(page)
    link.set_loss(0, 0)
    received = bytes(session.pcm[start:])
    await page.close()
    mic = _diff(m1["mic"], m0["mic"])
    row = {"path": path, "direction": direction, "loss_pct": loss, "seconds": seconds,
           "uplink": _uplink_shares(path, mic), "uplink_hold_ms": m1.get("mic_hold_ms"),
           "downlink": _browser_downlink(s0, s1), "browser_uplink": _browser_uplink(s0, s1),
           "server_downlink": _diff(m1.get("downlink", {}), m0.get("downlink", {})),
           "answer_audio": answer_audio_lines(s1.get("answer", ""))[:5]}
    if direction == "uplink":
        row["model_audio"] = await score(received, source, spans, transcriber)
    return row


CPU_JS = """async (n) => {
  // n calls from one page: getUserMedia with the page's constraints, offer, answer, <audio> playback.
  window.pcs = [];
  for (let i = 0; i < n; i++) {
    const mic = await navigator.mediaDevices.getUserMedia({audio: {echoCancellation: true, noiseSuppression: true, autoGainControl: true}});
    const pc = new RTCPeerConnection({iceServers: []});
    pc.createDataChannel('oai-events');
    mic.getTracks().forEach((t) => pc.addTrack(t, mic));
    pc.ontrack = (e) => { const a = new Audio(); a.srcObject = e.streams[0] || new MediaStream([e.track]); a.play(); };
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((r) => { if (pc.iceGatheringState === 'complete') r(); else pc.onicegatheringstatechange = () => pc.iceGatheringState === 'complete' && r(); });
    const resp = await fetch('/v1/realtime/calls', {method: 'POST', body: pc.localDescription.sdp, headers: {'Content-Type': 'application/sdp'}});
    await pc.setRemoteDescription({type: 'answer', sdp: await resp.text()});
    window.pcs.push(pc);
  }
  const t0 = Date.now();
  while (window.pcs.some((pc) => pc.connectionState !== 'connected') && Date.now() - t0 < 15000) await new Promise((r) => setTimeout(r, 100));
  return window.pcs.map((pc) => pc.connectionState);
}"""


async def cpu_calls(browser, url: str, stats: ProcStats, n: int, seconds: float) -> float:
    """Server cores per call with `n` browser calls up (full duplex), over `seconds`."""
    page = await browser.new_page()
    await page.goto(url + "/healthz")
    states = await page.evaluate(CPU_JS, n)
    if any(s != "connected" for s in states):
        await page.close()
        raise RuntimeError(f"browser calls did not connect: {states}")
    await asyncio.sleep(2.0)
    c0, t0 = stats.cpu_seconds(), time.monotonic()
    await asyncio.sleep(seconds)
    cores = (stats.cpu_seconds() - c0) / (time.monotonic() - t0)
    await page.close()
    await asyncio.sleep(1.0)
    return round(cores / n, 4)


async def browser_loss(quick: bool, server_cls, log, paths=("libopus", "aiortc"), extra_args=(), cpu=True) -> dict:
    """The section; `server_cls(args, name, host)` starts a server process (bench/run.py's Server)."""
    why = None if shutil.which("chromium") else "Debian's chromium is not installed (./test.sh --dev installs it)"
    why = why or LossyLink.unavailable()
    if why:
        return {"skipped": why}
    from playwright.async_api import async_playwright

    from localrt.stt import STTPool, Transcriber

    levels = [0, 10] if quick else [0, 5, 10, 20, 30]
    seconds = 22.0 if quick else 30.0  # the source is 20 s: every sentence heard at least once
    folder = RESULTS / "browser_loss"
    folder.mkdir(parents=True, exist_ok=True)
    mic, source, spans = make_source(folder)
    pool = STTPool(1)
    transcriber = Transcriber(pool)
    up = await InstantUpstream(mode="markers", keep_audio=True).start()
    rows: list[dict] = []
    clean: dict = {}
    cpu_result: dict = {}
    try:
        clean = {"wer_clean_source": (await score_clean(source, spans, transcriber))}
        with LossyLink(name="rtbenchbr", subnet="10.206.0") as link:
            for path in paths:
                srv = server_cls(["server.py", *ONE_ADDRESS, "--host", link.host_ip, "--realtime-url", up.url, "--audio-path", path,
                                  "--log-level", "INFO", "--media-timeout", "60", "--env-file", "/nonexistent",
                                  *extra_args],
                                 f"browser_{path}", host=link.host_ip)
                try:
                    async with async_playwright() as p:
                        browser = await launch(p, mic, link=link, origin=srv.url)
                        plan = [("uplink", 0)] + [(d, x) for d in ("uplink", "downlink") for x in levels if x]
                        for direction, loss in plan:
                            row = await one_run(browser, srv.url, up, link, path, direction, loss, seconds,
                                                source, spans, transcriber)
                            rows.append(row)
                            log(f"  {path:7s} {direction:8s} {loss:2d} %: {_line(row)}")
                        await browser.close()
                finally:
                    srv.stop()
            if cpu:
                log("  CPU per browser call: bridge vs bare aiortc echo peer")
                cpu_result = await cpu_section(link, mic, server_cls, up, quick)
                log(f"  {cpu_result}")
    finally:
        await transcriber.close()
        await pool.close()
        await up.stop()
    return {"seconds_per_run": seconds, "levels": levels, "source": {"sentences": SENTENCES,
            "voice": "Piper (the bundled en_US-joe voice)", "seconds":
            round(source.size / SCORE_RATE, 1)}, **clean, "runs": rows, "cpu": cpu_result,
            "loss": "nftables random UDP drop on the receiving side's input hook, one direction at a time"}


async def score_clean(source, spans, transcriber) -> float:
    from jiwer import wer

    hyps = [await transcriber.transcribe(source[a:b].astype("<i2").tobytes()) for a, b, _ in spans]
    norm = lambda s: " ".join("".join(c for c in s.lower() if c.isalnum() or c == " ").split())  # noqa: E731
    return round(wer([norm(t) for _, _, t in spans], [norm(h) or "-" for h in hyps]), 3)


async def cpu_section(link: LossyLink, mic: Path, server_cls, up: InstantUpstream, quick: bool) -> dict:
    from playwright.async_api import async_playwright

    n, seconds, repeats = 3, 8.0 if quick else 15.0, 1 if quick else 3
    ours, base = [], []
    srv = server_cls(["server.py", *ONE_ADDRESS, "--host", link.host_ip, "--realtime-url", up.url, "--log-level", "WARNING",
                      "--media-timeout", "60", "--env-file", "/nonexistent"], "browser_cpu_bridge", host=link.host_ip)
    echo = server_cls(["bench/baseline_echo.py", "--host", link.host_ip], "browser_cpu_echo", host=link.host_ip)
    try:
        async with async_playwright() as p:
            browser = await launch(p, mic, link=link, origin=f"{srv.url},{echo.url}")
            for _ in range(repeats):  # interleaved, so drift in the machine hits both alike
                ours.append(await cpu_calls(browser, srv.url, srv.stats, n, seconds))
                base.append(await cpu_calls(browser, echo.url, echo.stats, n, seconds))
            await browser.close()
    finally:
        srv.stop()
        echo.stop()
    o, b = float(np.median(ours)), float(np.median(base))
    return {"calls": n, "seconds": seconds, "bridge_cpu_per_call": o, "bare_aiortc_echo_cpu_per_call": b,
            "ratio": round(o / b, 2) if b else None, "bridge_runs": ours, "echo_runs": base}


def _line(row: dict) -> str:
    u, d = row["uplink"], row["downlink"]
    if row["direction"] == "uplink":
        m = row.get("model_audio", {})
        return (f"lost {u['lost']}/{u['frames']}: red {u['red']:.1%} fec {u['fec']:.1%} plc {u['concealed']:.1%} "
                f"silent {u['silence']:.1%} | PESQ {m.get('pesq_wb')} STOI {m.get('stoi')} WER {m.get('wer')} "
                f"gaps {m.get('gaps_60ms')} | hold p95 {(row['uplink_hold_ms'] or {}).get('p95')} ms | "
                f"browser sent {row['browser_uplink']['bytes_per_packet']} B/packet")
    return (f"browser lost {d['packets_lost']}: concealed {d['concealed_ratio']} fec/red rx {d['fec_packets_received']} "
            f"jb {d['jitter_buffer_ms']} ms")


if __name__ == "__main__":
    import argparse

    from bench.common import write_result
    from bench.run import Server, log

    ap = argparse.ArgumentParser(description="section 7 alone: a real browser under loss")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--paths", default="libopus,aiortc", help="audio paths to run (comma-separated)")
    ap.add_argument("--server-args", default="", help="extra server.py flags, e.g. '--browser-opus-bitrate 48000'")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU comparison")
    ap.add_argument("--name", default="", help="result file name (default browser_loss[_quick])")
    args = ap.parse_args()
    result = asyncio.run(browser_loss(args.quick, Server, log, tuple(args.paths.split(",")), tuple(args.server_args.split()),
                                      cpu=not args.no_cpu))
    name = args.name or ("browser_loss_quick" if args.quick else "browser_loss")
    print(json.dumps({"written": str(write_result(name, result))}))
