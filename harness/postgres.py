"""A real PostgreSQL server for tests (Debian's `postgresql`), in a temporary directory,
run as the `postgres` user on a port of its own; gone when stopped."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Optional


def _bin(name: str) -> Optional[str]:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


class Postgres:
    def __init__(self, port: int = 55432) -> None:
        self.port = port
        self.dir = ""
        self.url = f"postgresql://bridge:bridge-pw-0123@127.0.0.1:{port}/records"

    @staticmethod
    def unavailable() -> Optional[str]:
        if not _bin("initdb"):
            return "PostgreSQL is not installed (./test.sh installs it)"
        if os.geteuid() != 0:
            return "starting PostgreSQL as its own user needs root"
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "no 'postgres' user"
        return None

    def _as_postgres(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True, text=True)

    def start(self) -> "Postgres":
        self.dir = tempfile.mkdtemp(prefix="pg-")
        shutil.chown(self.dir, "postgres")
        data = os.path.join(self.dir, "data")
        self._as_postgres(_bin("initdb"), "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
        self._as_postgres(_bin("pg_ctl"), "-D", data, "-l", os.path.join(self.dir, "log"), "-w", "-o",
                          f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.1)
        psql = _bin("psql") or "psql"
        for sql in ("CREATE USER bridge PASSWORD 'bridge-pw-0123'", "CREATE DATABASE records OWNER bridge"):
            self._as_postgres(psql, "-h", self.dir, "-p", str(self.port), "-U", "postgres", "-c", sql)
        return self

    def stop(self) -> None:
        if self.dir:
            subprocess.run(["runuser", "-u", "postgres", "--", _bin("pg_ctl"), "-D", os.path.join(self.dir, "data"),
                            "-m", "immediate", "stop"], capture_output=True)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""

    def __enter__(self) -> "Postgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
