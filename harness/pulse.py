"""A private PulseAudio daemon as a browser's sound card, for browsers with no file microphone.

Chromium reads a WAV as its microphone (`--use-file-for-fake-audio-capture`); Firefox's fake
microphone is a fixed tone. So Firefox is given a real (virtual) sound card instead: a
PulseAudio daemon of its own (one per test, on a socket in a temporary directory, nothing
shared with the machine) with two null sinks:

- `mic`: its monitor is the default source, so what is played into `mic` is what the browser
  captures. `loop(wav)` plays a WAV into it from the moment the browser opens the microphone,
  over and over, as Chromium's file capture does;
- `speaker`: the default sink, where the browser plays the call. `echo(delay_ms, gain_db)` loops
  the speaker back into the microphone (`module-loopback`), which is how a phone on speaker
  with a failing echo canceller sounds to the server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

PULSEAUDIO = shutil.which("pulseaudio") or "/usr/bin/pulseaudio"


def available() -> Optional[str]:
    for tool in ("pulseaudio", "pactl", "paplay"):
        if not shutil.which(tool):
            return f"needs PulseAudio ('{tool}'; ./test.sh installs pulseaudio and pulseaudio-utils)"
    return None


class PulseAudio:
    def __init__(self) -> None:
        self._dir: Optional[tempfile.TemporaryDirectory] = None
        self._proc: Optional[subprocess.Popen] = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.env: dict[str, str] = {}

    def start(self, timeout_s: float = 10.0) -> "PulseAudio":
        self._dir = tempfile.TemporaryDirectory(prefix="rt-pulse-")
        root = self._dir.name
        socket = os.path.join(root, "native")
        self.env = {"PULSE_SERVER": f"unix:{socket}"}
        daemon_env = {**os.environ, "HOME": root, "PULSE_RUNTIME_PATH": root, "PULSE_STATE_PATH": root,
                      "XDG_CONFIG_HOME": root}
        # -n: no system configuration (no hardware probing); every module is named here.
        self._proc = subprocess.Popen(
            [PULSEAUDIO, "-n", "--daemonize=no", "--exit-idle-time=-1", "--use-pid-file=no",
             "--log-target=stderr", "--log-level=error",
             "-L", f"module-native-protocol-unix socket={socket} auth-anonymous=1",
             "-L", "module-null-sink sink_name=mic rate=48000 channels=1",
             "-L", "module-null-sink sink_name=speaker rate=48000 channels=2"],
            env=daemon_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while self._pactl("info", check=False).returncode != 0:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.poll() is not None else ""
                self.stop()
                raise RuntimeError(f"PulseAudio did not start: {err.strip()[-300:]}")
            time.sleep(0.05)
        self._pactl("set-default-source", "mic.monitor")
        self._pactl("set-default-sink", "speaker")
        return self

    def _pactl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["pactl", *args], env={**os.environ, **self.env}, capture_output=True, text=True,
                              check=check, timeout=10)

    def recording(self) -> bool:
        """Whether some client (the browser) has the microphone open."""
        out = self._pactl("list", "short", "source-outputs", check=False).stdout
        return any(line.strip() for line in out.splitlines())

    def loop(self, wav: Path) -> None:
        """Play `wav` into the microphone, again and again, from when a browser opens it.
        It is played as one long file (the WAV repeated for a minute), so there is no gap
        between repeats, over a -50 dBFS noise floor, as a real room and microphone have:
        Firefox passes digital silence through as exact zeros, which would look like holes to
        the tests (and a -70 dBFS floor came out of its noise suppressor as zeros too)."""
        wav = self._looped(wav)

        def run() -> None:
            while not self._stop.is_set() and not self.recording():
                self._stop.wait(0.02)
            while not self._stop.is_set():
                player = subprocess.Popen(["paplay", "--device=mic", str(wav)], env={**os.environ, **self.env},
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                while player.poll() is None:
                    if self._stop.wait(0.05):
                        player.terminate()
                        break
                player.wait()

        thread = threading.Thread(target=run, daemon=True, name="pulse-mic")
        thread.start()
        self._threads.append(thread)

    def _looped(self, wav: Path, seconds: float = 60.0) -> Path:
        import wave

        import numpy as np

        with wave.open(str(wav), "rb") as r:
            rate, channels = r.getframerate(), r.getnchannels()
            pcm = np.frombuffer(r.readframes(r.getnframes()), dtype="<i2")
        repeats = max(1, int(np.ceil(seconds * rate * channels / max(1, pcm.size))))
        tiled = np.tile(pcm, repeats).astype(np.float64)
        tiled += np.random.default_rng(0).normal(0.0, 32768 * 10 ** (-50 / 20), tiled.size)
        out = Path(self._dir.name) / f"looped-{wav.stem}.wav"
        with wave.open(str(out), "wb") as w:
            w.setnchannels(channels)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(np.clip(np.round(tiled), -32768, 32767).astype("<i2").tobytes())
        return out

    def echo(self, delay_ms: int = 150, gain_db: float = -6.0) -> None:
        """What the browser plays comes back into its microphone, `delay_ms` later at `gain_db`."""
        module = self._pactl("load-module", "module-loopback", "source=speaker.monitor", "sink=mic",
                             f"latency_msec={delay_ms}", "adjust_time=0").stdout.strip()
        volume = f"{10 ** (gain_db / 20):.3f}"
        for line in self._pactl("list", "short", "sink-inputs").stdout.splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[2] == module:
                self._pactl("set-sink-input-volume", fields[0], volume)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "PulseAudio":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
