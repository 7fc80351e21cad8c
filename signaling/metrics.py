"""Process metrics: event-loop lag, per-call audio health, process resources.

GET /metrics.json answers JSON (GET /metrics is Prometheus' text: signaling/prom.py). Overload shows here before users hear it: loop lag
p99 rising, playback frames late, mic frames lost.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque

import numpy as np
from aiohttp import web

INTERVAL_S = 0.05


class LoopLagMonitor:
    """How late the event loop wakes a 50 ms timer: the stall every call feels."""

    def __init__(self, window: int = 6000, observe=None) -> None:
        self.samples: deque[tuple[float, float]] = deque(maxlen=window)  # (monotonic, lag ms)
        self._task: asyncio.Task | None = None
        self._observe = observe  # (what, seconds): the Prometheus histogram

    async def _run(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(INTERVAL_S)
            lag = max(0.0, time.perf_counter() - start - INTERVAL_S)
            self.samples.append((time.monotonic(), lag * 1000))
            if self._observe is not None:
                self._observe("loop_lag", lag)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def summary(self, since_s: float = 60.0) -> dict:
        """Lag percentiles over the last `since_s` seconds."""
        cutoff = time.monotonic() - since_s
        return percentiles(lag for t, lag in self.samples if t >= cutoff)


def percentiles(values) -> dict:
    v = np.fromiter(values, dtype=float)
    if v.size == 0:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    return {"p50": round(float(np.percentile(v, 50)), 2), "p95": round(float(np.percentile(v, 95)), 2),
            "p99": round(float(np.percentile(v, 99)), 2), "max": round(float(v.max()), 2)}


def process_stats() -> dict:
    out = {"threads": 0, "rss_mb": 0.0, "fds": 0}
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                out["rss_mb"] = round(int(line.split()[1]) / 1024, 1)
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
        out["fds"] = len(os.listdir("/proc/self/fd"))
    except OSError:
        pass
    return out


LOOP_LAG = web.AppKey("loop_lag", LoopLagMonitor)


def install(app: web.Application, prom=None) -> None:
    async def lifecycle(app: web.Application):
        app[LOOP_LAG] = LoopLagMonitor(observe=prom.observe if prom is not None else None)
        app[LOOP_LAG].start()
        yield
        await app[LOOP_LAG].stop()

    app.cleanup_ctx.append(lifecycle)
