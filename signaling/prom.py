"""`GET /metrics` in Prometheus' text format (prometheus-client); the JSON view people read
is at `/metrics.json`.

Each app has its own `CollectorRegistry` (tests run several apps in one process).
Histograms are observed as things happen (loop lag every 50 ms, each upstream
connect, each response's latency); counts and gauges are read from the live calls
at scrape time, plus what ended calls left behind. Every sample carries a
`worker` label; with several workers, the worker asked merges its siblings'
families into one exposition.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from .metrics import process_stats

if TYPE_CHECKING:
    from .routes import CallRegistry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Per-call audio counters (Call.audio_counters) exported as counters: (path, key, metric, help).
AUDIO_COUNTERS = (
    ("uplink", "packets", "bridge_mic_packets_total", "RTP packets received from callers"),
    ("uplink", "lost", "bridge_mic_lost_frames_total", "caller frames lost on the network"),
    ("uplink", "red_recovered", "bridge_mic_red_recovered_frames_total", "lost caller frames rebuilt exactly from RED"),
    ("uplink", "fec_recovered", "bridge_mic_fec_recovered_frames_total", "lost caller frames rebuilt from Opus in-band FEC"),
    ("uplink", "concealed", "bridge_mic_concealed_frames_total", "lost caller frames concealed by Opus PLC"),
    ("uplink", "reordered", "bridge_mic_reordered_packets_total", "caller packets put back in order by the receive buffer"),
    ("uplink", "late", "bridge_mic_late_packets_total", "caller packets that came after their audio was rebuilt"),
    ("downlink", "packets", "bridge_downlink_packets_total", "Opus packets sent to callers"),
    ("downlink", "fec_packets", "bridge_downlink_fec_packets_total", "packets sent with in-band FEC"),
    ("downlink", "red_packets", "bridge_downlink_red_packets_total", "packets sent with RED"),
    ("echo", "detected", "bridge_echo_detected_calls_total",
     "calls in which the echo guard found the model's voice coming back in the caller's audio"),
    ("echo", "cancelled_ms", "bridge_echo_cancelled_ms_total",
     "ms of caller audio that reached the model through the echo canceller"),
)


class BridgeMetrics:
    def __init__(self, registry: "CallRegistry") -> None:
        self.calls = registry
        self.worker = str(registry.workers.index)
        self.prom = CollectorRegistry(auto_describe=False)
        self.loop_lag = Histogram("bridge_event_loop_lag_seconds", "how late the event loop woke a 50 ms timer",
                                  ["worker"], registry=self.prom,
                                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
        self.upstream_connect = Histogram("bridge_upstream_connect_seconds",
                                          "time to open and configure an upstream Realtime session", ["worker"],
                                          registry=self.prom, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.response_latency = Histogram(
            "bridge_response_latency_seconds",
            "from the end of the caller's turn (speech_stopped) to the model's first audio", ["worker"],
            registry=self.prom, buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10))
        self.tool_seconds = Histogram("bridge_tool_seconds", "how long a server-run tool's endpoint took to answer",
                                      ["worker", "tool", "status"], registry=self.prom,
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.ended: Counter[str] = Counter()  # end category → calls
        self.ended_audio: Counter[str] = Counter()  # metric → what ended calls counted
        self.ended_playback: Counter[str] = Counter()
        self.prom.register(_Live(self))

    def observe(self, what: str, seconds: float) -> None:
        {"upstream_connect": self.upstream_connect, "response_latency": self.response_latency,
         "loop_lag": self.loop_lag}[what].labels(self.worker).observe(seconds)

    def tool_ran(self, name: str, status: str, duration_ms: int) -> None:
        """A server-run tool answered, failed or was not run (its count is the histogram's)."""
        self.tool_seconds.labels(self.worker, name, status).observe(duration_ms / 1000)

    def call_ended(self, call) -> None:
        from control.records import end_category

        self.ended[end_category(call.reason)] += 1
        counters = call.audio_counters()
        for path, key, metric, _ in AUDIO_COUNTERS:
            self.ended_audio[metric] += counters[path].get(key, 0) or 0
        pb = call.playback.stats
        self.ended_playback.update(frames=pb.frames, late=pb.late_frames, reanchors=pb.reanchors)

    def exposition(self, siblings: Iterable[str] = ()) -> bytes:
        """This worker's metrics, merged with its siblings' expositions."""
        own = generate_latest(self.prom)
        texts = [t for t in siblings if t]
        if not texts:
            return own
        merged = _Merged([own.decode(), *texts])
        reg = CollectorRegistry(auto_describe=False)
        reg.register(merged)
        return generate_latest(reg)


class _Live:
    """What is read at scrape time."""

    def __init__(self, m: BridgeMetrics) -> None:
        self.m = m

    def collect(self) -> Iterable[Metric]:
        m, registry, w = self.m, self.m.calls, [self.m.worker]
        calls = list(registry.calls.values())
        g = GaugeMetricFamily("bridge_calls_active", "calls in progress", labels=["worker"])
        g.add_metric(w, len(calls))
        yield g
        c = CounterMetricFamily("bridge_calls", "calls started", labels=["worker"])
        c.add_metric(w, registry.total)
        yield c
        ended = CounterMetricFamily("bridge_calls_ended", "calls ended, by why", labels=["worker", "reason"])
        for category, n in sorted(m.ended.items()):
            ended.add_metric([m.worker, category], n)
        yield ended
        refused = CounterMetricFamily("bridge_offers_refused", "offers refused before a call was made",
                                      labels=["worker", "reason"])
        for reason, n in registry.refusals().items():
            refused.add_metric([m.worker, reason], n)
        yield refused
        live = [call.audio_counters() for call in calls]
        for path, key, metric, help_text in AUDIO_COUNTERS:
            fam = CounterMetricFamily(metric.removesuffix("_total"), help_text, labels=["worker"])
            fam.add_metric(w, m.ended_audio[metric] + sum(c[path].get(key, 0) or 0 for c in live))
            yield fam
        for key, metric, help_text in (("frames", "bridge_playback_frames", "20 ms frames sent toward callers"),
                                       ("late", "bridge_playback_late_frames", "frames sent later than their slot"),
                                       ("reanchors", "bridge_playback_reanchors", "times the pacing clock was reset")):
            fam = CounterMetricFamily(metric, help_text, labels=["worker"])
            attr = {"frames": "frames", "late": "late_frames", "reanchors": "reanchors"}[key]
            fam.add_metric(w, m.ended_playback[key] + sum(getattr(c.playback.stats, attr) for c in calls))
            yield fam
        held = GaugeMetricFamily("bridge_calls_held", "calls waiting for their caller to re-attach", labels=["worker"])
        held.add_metric(w, sum(1 for c in calls if c.held_since is not None))
        yield held
        sidebands = GaugeMetricFamily("bridge_sidebands", "operator sideband connections", labels=["worker"])
        sidebands.add_metric(w, sum(len(c.sidebands) for c in calls))
        yield sidebands
        plane = registry.plane
        deliverer = plane.deliverer if plane is not None else None
        if deliverer is not None:
            hooks = CounterMetricFamily("bridge_webhook_attempts", "webhook deliveries tried, by outcome",
                                        labels=["worker", "outcome"])
            hooks.add_metric([m.worker, "delivered"], deliverer.delivered)
            hooks.add_metric([m.worker, "failed"], deliverer.failed_attempts)
            yield hooks
        if plane is not None and plane.store is not None:
            failures = CounterMetricFamily("bridge_record_write_failures", "call records that could not be written",
                                           labels=["worker"])
            failures.add_metric(w, plane.write_failures)
            yield failures
        proc = process_stats()
        for key, metric in (("rss_mb", "bridge_process_resident_megabytes"), ("fds", "bridge_process_open_fds"),
                            ("threads", "bridge_process_threads")):
            fam = GaugeMetricFamily(metric, key.replace("_", " "), labels=["worker"])
            fam.add_metric(w, proc[key])
            yield fam


class _Merged:
    """Several expositions as one: same-named families get each other's samples."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for text in self.texts:
            for fam in text_string_to_metric_families(text):
                into = families.get(fam.name)
                if into is None:
                    families[fam.name] = fam
                else:
                    into.samples.extend(fam.samples)
        return list(families.values())


def install(app, registry: "CallRegistry") -> BridgeMetrics:
    metrics = BridgeMetrics(registry)
    registry.metrics = metrics
    app[PROM] = metrics
    return metrics


PROM = web.AppKey("prometheus", BridgeMetrics)
