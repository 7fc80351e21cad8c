"""A cluster on one machine, for tests and benchmarks: nodes in their own network
namespaces (their own addresses, on a Linux bridge), a real redis-server, and
`server.py --redis-url` in each namespace.

    with ClusterNet(3) as net:          # namespaces rtnode0..2 at 10.210.0.10..12, this side .1
        redis_url = net.start_redis()
        node = net.start_node(0, "--realtime-url", stub.url, ...)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent


def _sh(*cmd: str) -> None:
    subprocess.run(list(cmd), check=True, capture_output=True, text=True)


@dataclass
class Node:
    index: int
    address: str
    port: int
    proc: subprocess.Popen
    log: Path
    node_id: str = ""

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class ClusterNet:
    count: int
    subnet: str = "10.210.0"
    prefix: str = "rtnode"
    bridge: str = "rtclbr0"
    nodes: list[Node] = field(default_factory=list)
    redis: Optional[subprocess.Popen] = None
    redis_port: int = 6390

    @property
    def host_ip(self) -> str:
        return f"{self.subnet}.1"

    def address(self, i: int) -> str:
        return f"{self.subnet}.{10 + i}"

    @staticmethod
    def unavailable() -> Optional[str]:
        if os.geteuid() != 0:
            return "network namespaces need root"
        for tool in ("ip", "redis-server"):
            if not shutil.which(tool):
                return f"'{tool}' is not installed (./test.sh installs iproute2 and redis-server)"
        return None

    def up(self) -> "ClusterNet":
        self.down()
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for i in range(self.count):
            ns, outside, inside = f"{self.prefix}{i}", f"{self.prefix}{i}h", f"{self.prefix}{i}n"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            _sh("ip", "link", "set", inside, "netns", ns)
            _sh("ip", "link", "set", outside, "master", self.bridge)
            _sh("ip", "link", "set", outside, "up")
            _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.address(i)}/24", "dev", inside)
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", inside, "up")
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        return self

    def start_redis(self) -> str:
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", self.host_ip, "--save", "", "--appendonly", "no",
             "--protected-mode", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import socket

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host_ip, self.redis_port), timeout=0.5):
                    return f"redis://{self.host_ip}:{self.redis_port}/0"
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def start_node(self, i: int, *args: str, port: int = 8080, env: Optional[dict] = None) -> Node:
        log = Path(tempfile.mkstemp(prefix=f"node{i}-", suffix=".log")[1])
        environ = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "REALTIME_URL")}
        environ.update(env or {})
        with open(log, "w") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", f"{self.prefix}{i}", sys.executable, "server.py", "--host", self.address(i),
                 "--port", str(port), "--node-id", f"node{i}", "--env-file", "/nonexistent", *args],
                cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT)
        node = Node(i, self.address(i), port, proc, log, f"node{i}")
        self.nodes.append(node)
        return node

    def wait_ready(self, node: Node, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"node {node.index} exited: {node.output()[-3000:]}")
            try:
                with urllib.request.urlopen(node.url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"node {node.index} never answered: {node.output()[-3000:]}")

    def stop_node(self, node: Node, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if node.proc.poll() is None:
            node.proc.send_signal(sig)
            try:
                node.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
        return node.proc.returncode

    def down(self) -> None:
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.kill()
                node.proc.wait()
            node.log.unlink(missing_ok=True)
        self.nodes.clear()
        if self.redis is not None and self.redis.poll() is None:
            self.redis.terminate()
            self.redis.wait()
        for i in range(self.count):
            subprocess.run(["ip", "link", "del", f"{self.prefix}{i}h"], capture_output=True)
            subprocess.run(["ip", "netns", "del", f"{self.prefix}{i}"], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def __enter__(self) -> "ClusterNet":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
