"""A streaming PCM16 resampler (libswresample through an FFmpeg filter graph).

Written by hand instead of using `av.AudioResampler` because that class builds
its filter graph with FFmpeg's default thread count: every instance starts a
pool of OS threads (4 on a 2-core machine), i.e. several per call, freed only
when Python's cycle collector gets to the call. This one sets `threads = 1`
(audio filters here gain nothing from threads) and keeps the same ~16-sample
delay of swr.
"""

from __future__ import annotations

from typing import Optional

import av
import numpy as np
from av.filter import Graph


class StreamResampler:
    """PCM16 in (any rate/layout), PCM16 mono or stereo out at `rate`; stateful across calls."""

    def __init__(self, rate: int, layout: str = "mono") -> None:
        self.rate = rate
        self.layout = layout
        self._graph: Optional[Graph] = None
        self._source: Optional[tuple] = None

    def _build(self, frame: av.AudioFrame) -> None:
        graph = Graph()
        graph.threads = 1
        src = graph.add("abuffer", sample_rate=str(frame.sample_rate), sample_fmt=frame.format.name,
                        channel_layout=frame.layout.name, time_base=f"1/{frame.sample_rate}")
        fmt = graph.add("aformat", sample_rates=str(self.rate), sample_fmts="s16", channel_layouts=self.layout)
        sink = graph.add("abuffersink")
        src.link_to(fmt)
        fmt.link_to(sink)
        graph.configure()
        self._graph = graph

    def frame(self, frame: av.AudioFrame) -> np.ndarray:
        """Resample one frame; returns interleaved int16 samples (possibly empty)."""
        source = (frame.format.name, frame.layout.name, frame.sample_rate)
        if source != self._source:
            # a format change (renegotiation) needs a new graph, not an error
            self._build(frame)
            self._source = source
            self._pts = 0
        # pts must be continuous for the graph; the caller's timing is not ours to keep here
        frame.pts = self._pts
        self._pts += frame.samples
        self._graph.push(frame)
        out = []
        while True:
            try:
                out.append(self._graph.pull().to_ndarray().reshape(-1))
            except (EOFError, av.error.BlockingIOError):
                break
        return np.concatenate(out) if out else np.zeros(0, dtype="<i2")

    def pcm(self, pcm: bytes, rate: int, layout: str = "mono") -> np.ndarray:
        channels = 2 if layout == "stereo" else 1
        frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm, dtype="<i2").reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate = rate
        assert frame.samples * channels * 2 == len(pcm)
        return self.frame(frame)
