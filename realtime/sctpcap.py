"""A bound on what a peer's data channel can make the server hold, whatever the peer does.

aiortc advertises a 256 KiB message limit (`max-message-size` in the answer) and a
1 MiB receive window, but enforces neither: it reassembles whatever fragments come,
so a non-browser peer once pushed a 32 MB message into memory. Browsers keep to
both (Chrome refuses to send a bigger message). So:

- a message over the advertised limit is dropped on arrival, and the page told why
  (the call goes on);
- a peer whose unreassembled fragments exceed the receive window is ignoring
  SCTP flow control: its call ends, with the reason.

aiortc has no hook for either; this wraps two methods of the call's own
`RTCSctpTransport` instance (aiortc 1.16 names, checked at install).
"""

from __future__ import annotations

import logging
from typing import Callable

logger = logging.getLogger(__name__)

try:  # the limit aiortc puts in the answer
    from aiortc.rtcsctptransport import LOCAL_MAX_MESSAGE_SIZE as MAX_MESSAGE_BYTES
except ImportError:  # pragma: no cover
    MAX_MESSAGE_BYTES = 262144
#: aiortc's initial advertised receive window.
RECEIVE_WINDOW_BYTES = 1024 * 1024


def install(transport, on_oversized: Callable[[int], None], on_flood: Callable[[int], None]) -> bool:
    """Wrap `transport` (an aiortc RTCSctpTransport); False if its internals are not 1.16's."""
    receive_chunk = getattr(transport, "_receive_data_chunk", None)
    deliver = getattr(transport, "_receive", None)
    streams = getattr(transport, "_inbound_streams", None)
    if receive_chunk is None or deliver is None or not isinstance(streams, dict):
        logger.warning("aiortc's SCTP transport differs from 1.16: data-channel sizes are not capped")
        return False
    held = {"bytes": 0, "flooded": False}

    async def receive_data_chunk(chunk) -> None:
        if held["flooded"]:
            return
        await receive_chunk(chunk)
        # what is left after reassembly: fragments of unfinished messages, or messages waiting
        # behind a lost one. Counted only while something is held (usually nothing is).
        total = 0
        for stream in transport._inbound_streams.values():
            for c in stream.reassembly:
                total += len(c.user_data)
        held["bytes"] = total
        if total > RECEIVE_WINDOW_BYTES:
            held["flooded"] = True
            for stream in transport._inbound_streams.values():
                stream.reassembly.clear()
            on_flood(total)

    async def receive(stream_id: int, pp_id: int, data: bytes) -> None:
        if len(data) > MAX_MESSAGE_BYTES:
            on_oversized(len(data))
            return
        await deliver(stream_id, pp_id, data)

    transport._receive_data_chunk = receive_data_chunk
    transport._receive = receive
    return True
