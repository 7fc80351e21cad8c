"""Load-aware admission: a new call is refused while this process is too loaded to
give the calls it already has what they need.

Counting calls is not enough: one process on two cores was measured admitting 20
calls while its downlink p99 reached 2.5 s. What admitted calls suffer from is
visible in three signals, read over the last few seconds: the event loop waking
late (every call's audio is paced on it), outbound frames handed to the encoder
late (the browser hears gaps), and the process's CPU nearing a whole core (one
loop cannot use more). Above any threshold a new offer gets 503 with
`Retry-After`, and `/readyz` says not ready, so a load balancer sends it elsewhere.

The lag and lateness signals are 95th percentiles, not 99th: a single stall (a
call being set up costs the loop some milliseconds of crypto and ICE work, a
garbage collection more) shows in the p99 of a few seconds' frames, while an
overloaded loop is late on most of them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

WINDOW_S = 5.0


@dataclass(frozen=True)
class Thresholds:
    loop_lag_ms: float = 25.0  # p95 over WINDOW_S
    lateness_ms: float = 20.0  # p95 over WINDOW_S
    cpu_cores: float = 0.9


#: For a process that is not only a server (tests run clients on the same loop): never refuse.
NEVER = Thresholds(float("inf"), float("inf"), float("inf"))


class ProcessCpu:
    """This process's CPU use (cores) over the last WINDOW_S, from /proc (or os.times)."""

    def __init__(self) -> None:
        self._samples: list[tuple[float, float]] = []

    @staticmethod
    def _cpu_seconds() -> float:
        t = os.times()
        return t.user + t.system

    def cores(self) -> float:
        now, cpu = time.monotonic(), self._cpu_seconds()
        self._samples.append((now, cpu))
        self._samples = [s for s in self._samples if now - s[0] <= WINDOW_S * 2]
        old = next((s for s in self._samples if now - s[0] >= WINDOW_S / 2), None)
        if old is None:
            return 0.0
        return (cpu - old[1]) / max(1e-6, now - old[0])


class Admission:
    def __init__(self, loop_lag_p95: Callable[[], float], lateness_p95: Callable[[], float],
                 thresholds: Thresholds = Thresholds(), cpu: Optional[ProcessCpu] = None) -> None:
        self._lag, self._late = loop_lag_p95, lateness_p95
        self.thresholds = thresholds
        self._cpu = cpu or ProcessCpu()
        self.refused = 0

    def overload(self) -> Optional[str]:
        """Why this process should take no new call now (None if it can)."""
        t = self.thresholds
        lag = self._lag()
        if lag > t.loop_lag_ms:
            return f"event-loop lag p95 {lag:.0f} ms over the last {WINDOW_S:g} s (limit {t.loop_lag_ms:g})"
        late = self._late()
        if late > t.lateness_ms:
            return f"outbound audio frames late by {late:.0f} ms (p95; limit {t.lateness_ms:g})"
        cores = self._cpu.cores()
        if cores > t.cpu_cores:
            return f"CPU at {cores:.2f} cores (limit {t.cpu_cores:g}: one event loop uses one core)"
        return None
