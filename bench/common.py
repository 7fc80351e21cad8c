"""Shared bits of the benchmarks: percentiles, machine description, result files, processes."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def pcts(values: Iterable[float], digits: int = 1) -> dict:
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    return {"n": int(v.size), "p50": round(float(np.percentile(v, 50)), digits),
            "p95": round(float(np.percentile(v, 95)), digits), "p99": round(float(np.percentile(v, 99)), digits),
            "max": round(float(v.max()), digits)}


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "kernel": platform.release()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), **data}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


class ProcStats:
    """CPU seconds, RSS, fds and threads of a process and its children (a server with
    worker processes counts whole), from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._tick = os.sysconf("SC_CLK_TCK")

    def pids(self) -> list[int]:
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    todo += [int(c) for c in open(f"/proc/{pid}/task/{tid}/children").read().split()]
            except OSError:
                pass
        return out

    def _sum(self, read) -> float:
        total = 0.0
        for pid in self.pids():
            try:
                total += read(pid)
            except OSError:
                pass  # a child that just exited
        return total

    def cpu_seconds(self) -> float:
        def one(pid: int) -> float:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / self._tick  # utime + stime
        return self._sum(one)

    def _status(self, key: str, pid: int) -> int:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(key):
                return int(line.split()[1])
        return 0

    def rss_mb(self) -> float:
        return self._sum(lambda pid: self._status("VmRSS:", pid)) / 1024

    def threads(self) -> int:
        return int(self._sum(lambda pid: self._status("Threads:", pid)))

    def fds(self) -> int:
        return int(self._sum(lambda pid: len(os.listdir(f"/proc/{pid}/fd"))))


#: Every benchmark client comes from one address: the per-address offer limits, made for
#: clients on the internet, are off for the server under test.
ONE_ADDRESS = ["--offers-per-minute", "0", "--pending-offers-per-address", "0"]


def start_process(args: list[str], env: Optional[dict] = None, log: Optional[Path] = None) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "REALTIME_API_KEY", "REALTIME_URL")}
    full_env.update(env or {})
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)


def wait_http(url: str, timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")
