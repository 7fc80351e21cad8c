"""libopus itself, through ctypes: the decoder and encoder each call owns.

Why by hand: aiortc codes Opus through PyAV/FFmpeg, whose libopus wrapper
hard-codes `decode_fec=0`, has no concealment path (an empty packet decodes to
nothing; `decode(None)` ends the decoder for good) and reads encoder options only
when it opens. A model listener on a lossy network needs exactly those three:
in-band FEC recovery, packet-loss concealment, and FEC sized from the loss the
browser reports, changed during the call. The Python bindings on PyPI
(`opuslib`, unmaintained since 2018; `opuslib-next-bundled`, a second copy of
the library) add nothing over a dozen ctypes prototypes, while PyAV's wheel,
which aiortc already needs, ships libopus (1.6 here): binding that one keeps a
single libopus in the process. `OPUS_LIBRARY` names another file if needed.

All calls are short and synchronous (≈10-60 µs per 20 ms frame); ctypes drops
the GIL while libopus runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
from pathlib import Path
from typing import Optional

# opus_defines.h
OPUS_OK = 0
OPUS_APPLICATION_VOIP = 2048
OPUS_SET_BITRATE = 4002
OPUS_SET_VBR = 4006
OPUS_SET_COMPLEXITY = 4010
OPUS_SET_INBAND_FEC = 4012
OPUS_SET_PACKET_LOSS_PERC = 4014
OPUS_SET_DTX = 4016
OPUS_SET_SIGNAL = 4024
OPUS_GET_LOOKAHEAD = 4027
OPUS_SIGNAL_VOICE = 3001

#: Longest Opus packet is 120 ms; at 48 kHz that is 5760 samples per channel.
MAX_FRAME_SAMPLES_48K = 5760
MAX_PACKET_BYTES = 1500


class OpusError(RuntimeError):
    pass


def _find_library() -> str:
    explicit = os.environ.get("OPUS_LIBRARY")
    if explicit:
        return explicit
    try:
        import av  # the wheel's own copy: same library aiortc's codec uses

        root = Path(av.__file__).resolve().parent
        for pattern in ("../av.libs/libopus*.so*", ".dylibs/libopus*.dylib", "../av.libs/opus*.dll"):
            found = sorted(glob.glob(str(root / pattern)))
            if found:
                return found[0]
    except ImportError:
        pass
    name = ctypes.util.find_library("opus")
    if name:
        return name
    raise OpusError("libopus not found: install PyAV's wheel or set OPUS_LIBRARY to libopus's path")


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(_find_library())
    c_int, c_void_p, c_char_p = ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p
    p_int16 = ctypes.POINTER(ctypes.c_int16)
    lib.opus_decoder_create.argtypes = [ctypes.c_int32, c_int, ctypes.POINTER(c_int)]
    lib.opus_decoder_create.restype = c_void_p
    lib.opus_decoder_destroy.argtypes = [c_void_p]
    lib.opus_decode.argtypes = [c_void_p, c_char_p, ctypes.c_int32, p_int16, c_int, c_int]
    lib.opus_decode.restype = c_int
    lib.opus_encoder_create.argtypes = [ctypes.c_int32, c_int, c_int, ctypes.POINTER(c_int)]
    lib.opus_encoder_create.restype = c_void_p
    lib.opus_encoder_destroy.argtypes = [c_void_p]
    lib.opus_encode.argtypes = [c_void_p, p_int16, c_int, c_char_p, ctypes.c_int32]
    lib.opus_encode.restype = ctypes.c_int32
    # opus_encoder_ctl is variadic: its requests are given as (c_void_p, c_int, c_int).
    lib.opus_encoder_ctl.restype = c_int
    lib.opus_packet_has_lbrr.argtypes = [c_char_p, ctypes.c_int32]
    lib.opus_packet_has_lbrr.restype = c_int
    lib.opus_packet_get_nb_samples.argtypes = [c_char_p, ctypes.c_int32, ctypes.c_int32]
    lib.opus_packet_get_nb_samples.restype = c_int
    lib.opus_strerror.argtypes = [c_int]
    lib.opus_strerror.restype = c_char_p
    lib.opus_get_version_string.restype = c_char_p
    return lib


_lib: Optional[ctypes.CDLL] = None


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


def version() -> str:
    return lib().opus_get_version_string().decode()


def _check(code: int, what: str) -> int:
    if code < 0:
        raise OpusError(f"{what}: {lib().opus_strerror(code).decode()}")
    return code


def packet_samples(packet: bytes, rate: int) -> int:
    """Samples per channel the packet decodes to at `rate` (0 if it is not valid Opus)."""
    if not packet:
        return 0
    n = lib().opus_packet_get_nb_samples(packet, len(packet), rate)
    return n if n > 0 else 0


def has_lbrr(packet: bytes) -> bool:
    """True if the packet carries in-band FEC (LBRR) for the frame before it."""
    return bool(packet) and lib().opus_packet_has_lbrr(packet, len(packet)) == 1


class Decoder:
    """One libopus decoder (stateful: one per stream), PCM16 out at any Opus rate."""

    def __init__(self, rate: int, channels: int = 1) -> None:
        err = ctypes.c_int()
        self.rate, self.channels = rate, channels
        self._st = lib().opus_decoder_create(rate, channels, ctypes.byref(err))
        _check(err.value, "opus_decoder_create")
        self._max = MAX_FRAME_SAMPLES_48K * rate // 48000
        self._pcm = (ctypes.c_int16 * (self._max * channels))()

    def _run(self, data: Optional[bytes], samples: int, fec: int) -> bytes:
        if self._st is None:
            raise OpusError("decoder is closed")
        n = lib().opus_decode(self._st, data, len(data) if data else 0, self._pcm, min(samples, self._max), fec)
        _check(n, "opus_decode")
        return ctypes.string_at(self._pcm, n * 2 * self.channels)

    def decode(self, packet: bytes) -> bytes:
        """A received packet, decoded."""
        return self._run(packet, self._max, 0)

    def decode_fec(self, next_packet: bytes, samples: int) -> bytes:
        """The frame *before* `next_packet`, rebuilt from its LBRR (concealed if it has none).
        `samples` is the lost frame's duration; decode `next_packet` itself afterwards."""
        return self._run(next_packet, samples, 1)

    def conceal(self, samples: int) -> bytes:
        """Packet-loss concealment for `samples` (a multiple of 2.5 ms)."""
        return self._run(None, samples, 0)

    def close(self) -> None:
        if self._st is not None:
            lib().opus_decoder_destroy(self._st)
            self._st = None

    def __del__(self) -> None:
        self.close()


class Encoder:
    """One libopus encoder for speech (VoIP application), settings changeable while it runs."""

    def __init__(self, rate: int, channels: int = 1, *, bitrate: int = 32000, fec: bool = True,
                 loss_percent: int = 0, dtx: bool = False, complexity: int = 9) -> None:
        err = ctypes.c_int()
        self.rate, self.channels = rate, channels
        self._st = lib().opus_encoder_create(rate, channels, OPUS_APPLICATION_VOIP, ctypes.byref(err))
        _check(err.value, "opus_encoder_create")
        self._out = ctypes.create_string_buffer(MAX_PACKET_BYTES)
        self.loss_percent = -1
        self._ctl(OPUS_SET_BITRATE, bitrate)
        self._ctl(OPUS_SET_COMPLEXITY, complexity)
        self._ctl(OPUS_SET_SIGNAL, OPUS_SIGNAL_VOICE)
        self._ctl(OPUS_SET_INBAND_FEC, 1 if fec else 0)
        self._ctl(OPUS_SET_DTX, 1 if dtx else 0)
        self.set_loss_percent(loss_percent)

    def _ctl(self, request: int, value: int) -> None:
        _check(lib().opus_encoder_ctl(ctypes.c_void_p(self._st), ctypes.c_int(request), ctypes.c_int(value)),
               f"opus_encoder_ctl({request})")

    def set_loss_percent(self, percent: int) -> None:
        """The loss the receiver reports: libopus sizes its in-band FEC from it."""
        percent = max(0, min(100, int(percent)))
        if percent != self.loss_percent:
            self._ctl(OPUS_SET_PACKET_LOSS_PERC, percent)
            self.loss_percent = percent

    def set_bitrate(self, bitrate: int) -> None:
        self._ctl(OPUS_SET_BITRATE, bitrate)

    def set_dtx(self, on: bool) -> None:
        self._ctl(OPUS_SET_DTX, 1 if on else 0)

    def encode(self, pcm: bytes) -> bytes:
        """One frame of PCM16 (2.5-60 ms at the encoder's rate) → one Opus packet."""
        if self._st is None:
            raise OpusError("encoder is closed")
        samples = len(pcm) // (2 * self.channels)
        buf = (ctypes.c_int16 * (samples * self.channels)).from_buffer_copy(pcm)
        n = lib().opus_encode(self._st, buf, samples, self._out, MAX_PACKET_BYTES)
        _check(n, "opus_encode")
        return self._out.raw[:n]

    def close(self) -> None:
        if self._st is not None:
            lib().opus_encoder_destroy(self._st)
            self._st = None

    def __del__(self) -> None:
        self.close()
