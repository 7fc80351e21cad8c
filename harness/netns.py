"""A lossy network for a real browser: its own network namespace, a veth to this one,
and nftables random UDP loss set per direction.

This kernel has no netem; namespaces and nftables do work (as root). The browser
runs inside the namespace (`ip netns exec`, through a small wrapper that
Playwright starts as its "executable"); the server listens on this side's veth
address. Loss is dropped on the *input* hook of the receiving side (dropping on
output is a send error, not a loss): uplink loss in this namespace, matched to
the veth only (nothing else on the machine is touched), downlink loss inside the
browser's namespace. Only UDP is dropped, so signaling (HTTP over TCP) is not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=True, capture_output=True, text=True)


class LossyLink:
    def __init__(self, name: str = "rtlossy", subnet: str = "10.204.0") -> None:
        self.ns = name
        self.host_if, self.ns_if = f"{name[:9]}0", f"{name[:9]}1"
        self.host_ip, self.ns_ip = f"{subnet}.1", f"{subnet}.2"
        self.table = name
        self._wrapper: Optional[Path] = None

    @staticmethod
    def unavailable() -> Optional[str]:
        """Why this machine cannot build the link (None if it can)."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        for tool in ("ip", "nft"):
            if not shutil.which(tool):
                return f"'{tool}' is not installed (iproute2, nftables)"
        probe = "rtprobe"
        try:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True)
            _sh("ip", "netns", "add", probe)
            _sh("ip", "netns", "exec", probe, "nft", "list", "tables")
        except (subprocess.CalledProcessError, OSError) as exc:
            return f"network namespaces or nftables refused: {getattr(exc, 'stderr', '') or exc}".strip()
        finally:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return None

    def _in_ns(self, *cmd: str) -> None:
        _sh("ip", "netns", "exec", self.ns, *cmd)

    def up(self) -> "LossyLink":
        self.down()
        _sh("ip", "netns", "add", self.ns)
        _sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _sh("ip", "link", "set", self.ns_if, "netns", self.ns)
        _sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
        _sh("ip", "link", "set", self.host_if, "up")
        self._in_ns("ip", "addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if)
        self._in_ns("ip", "link", "set", self.ns_if, "up")
        self._in_ns("ip", "link", "set", "lo", "up")
        for inside in (False, True):
            run = self._in_ns if inside else _sh
            run("nft", "add", "table", "inet", self.table)
            run("nft", "add", "chain", "inet", self.table, "input", "{ type filter hook input priority 0 ; }")
        self.set_loss(0, 0)
        return self

    def set_loss(self, uplink_pct: float, downlink_pct: float) -> None:
        """Random UDP loss, in percent (0.1 % steps), browser → server and server → browser."""
        _sh("nft", "flush", "chain", "inet", self.table, "input")
        self._in_ns("nft", "flush", "chain", "inet", self.table, "input")
        def share(pct: float) -> list[str]:  # 100 %: every packet (nft refuses "< 1000" of mod 1000)
            return [] if pct >= 100 else ["numgen", "random", "mod", "1000", "<", str(round(pct * 10))]

        if uplink_pct > 0:
            _sh("nft", "add", "rule", "inet", self.table, "input", "iifname", self.host_if, "meta", "l4proto", "udp",
                *share(uplink_pct), "drop")
        if downlink_pct > 0:
            self._in_ns("nft", "add", "rule", "inet", self.table, "input", "meta", "l4proto", "udp",
                        *share(downlink_pct), "drop")

    def readdress(self, last_octet: int) -> str:
        """The browser's side gets a new address, as a phone moving from Wi-Fi to cellular
        does: its old ICE candidates die. Returns the new address."""
        new_ip = self.ns_ip.rsplit(".", 1)[0] + f".{last_octet}"
        self._in_ns("ip", "addr", "del", f"{self.ns_ip}/24", "dev", self.ns_if)
        self._in_ns("ip", "addr", "add", f"{new_ip}/24", "dev", self.ns_if)
        self.ns_ip = new_ip
        return new_ip

    def wrap(self, executable: str) -> str:
        """A path that runs `executable` inside the namespace (for Playwright's executable_path)."""
        if self._wrapper is None:
            fd, path = tempfile.mkstemp(prefix=f"{self.ns}-", suffix=".sh")
            with os.fdopen(fd, "w") as f:
                f.write(f'#!/bin/sh\nexec ip netns exec {self.ns} {executable} "$@"\n')
            os.chmod(path, 0o755)
            self._wrapper = Path(path)
        return str(self._wrapper)

    def down(self) -> None:
        subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        if self._wrapper is not None:
            self._wrapper.unlink(missing_ok=True)
            self._wrapper = None

    def __enter__(self) -> "LossyLink":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
