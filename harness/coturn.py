"""A real coturn (Debian's `turnserver`) for tests and benchmarks, on the TURN REST secret.

Started with no configuration file (`-n`): TURN over UDP and TCP on one port of one
address, REST credentials (`use-auth-secret`), relay ports in a small range.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional


class Coturn:
    def __init__(self, address: str, secret: str, *, port: int = 3478, realm: str = "bridge.test") -> None:
        self.address, self.secret, self.port, self.realm = address, secret, port, realm
        self.proc: Optional[subprocess.Popen] = None
        self.log = Path(tempfile.mkstemp(prefix="coturn-", suffix=".log")[1])

    @staticmethod
    def unavailable() -> Optional[str]:
        return None if shutil.which("turnserver") else "coturn is not installed (./test.sh installs it)"

    def start(self) -> "Coturn":
        self.proc = subprocess.Popen(
            ["turnserver", "-n", "--listening-ip", self.address, "--relay-ip", self.address,
             "--listening-port", str(self.port), "--use-auth-secret", f"--static-auth-secret={self.secret}",
             "--realm", self.realm, "--no-tls", "--no-dtls", "--no-cli", "--fingerprint",
             "--min-port", "49700", "--max-port", "49799", "--log-file", str(self.log), "--simple-log",
             "--no-stdout-log", "--allow-loopback-peers"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.address, self.port), timeout=0.5):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"turnserver exited: {self.log.read_text()[-2000:]}")
                time.sleep(0.1)
        raise RuntimeError("turnserver did not start listening")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.unlink(missing_ok=True)

    def __enter__(self) -> "Coturn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
