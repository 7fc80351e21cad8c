"""A bound on what a peer's data channel can make the server hold, whatever the peer does.

aiortc advertises a 256 KiB message limit (`max-message-size` in the answer) and a
1 MiB receive window, but enforces neither: it reassembles whatever fragments come,
so a non-browser peer once pushed a 32 MB message into memory. Browsers keep to
both (Chrome refuses to send a bigger message). So:

- a message over the advertised limit is dropped on arrival, and the page told why
  (the call goes on);
- a peer whose unreassembled fragments exceed the receive window is ignoring
  SCTP flow control: its call ends, with the reason;
- a text message (payload protocol "WebRTC String") whose bytes are not UTF-8 is
  dropped and the page told where the bad byte is (aiortc decodes it unguarded, and
  the exception took the call's SCTP association down with it); a channel-open
  request with a label that is not UTF-8, or for a stream already open (aiortc
  asserts), is dropped with a warning.

aiortc has no hook for either; this wraps two methods of the call's own
`RTCSctpTransport` instance (aiortc 1.16 names, checked at install).
"""

from __future__ import annotations

import logging
from struct import unpack_from
from typing import Callable, Optional

logger = logging.getLogger(__name__)

try:  # the limit aiortc puts in the answer
    from aiortc.rtcsctptransport import LOCAL_MAX_MESSAGE_SIZE as MAX_MESSAGE_BYTES
except ImportError:  # pragma: no cover
    MAX_MESSAGE_BYTES = 262144
#: aiortc's initial advertised receive window.
RECEIVE_WINDOW_BYTES = 1024 * 1024
#: RFC 8831's payload protocol ids for a channel-control message and a text message.
PPID_DCEP, PPID_STRING = 50, 51
_DCEP_OPEN = 0x03


def invalid_text(data: bytes) -> Optional[UnicodeDecodeError]:
    """Why a text message's bytes are not UTF-8 (None when they are)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc
    return None


def bad_channel_open(data: bytes) -> Optional[str]:
    """What is wrong with a DATA_CHANNEL_OPEN that aiortc would choke on, if anything."""
    if len(data) < 12 or data[0] != _DCEP_OPEN:
        return None
    label_length, protocol_length = unpack_from("!HH", data, 8)
    if invalid_text(data[12:12 + label_length]) or invalid_text(data[12 + label_length:12 + label_length + protocol_length]):
        return "its label or protocol is not UTF-8"
    return None


def install(transport, on_oversized: Callable[[int], None], on_flood: Callable[[int], None],
            on_invalid_text: Callable[[UnicodeDecodeError], None] = lambda exc: None) -> bool:
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
        if pp_id == PPID_STRING:
            bad = invalid_text(data)
            if bad is not None:
                on_invalid_text(bad)
                return
        elif pp_id == PPID_DCEP:
            channels = getattr(transport, "_data_channels", {})
            reason = bad_channel_open(data)
            if reason is None and len(data) >= 12 and data[0] == _DCEP_OPEN and stream_id in channels:
                reason = f"stream {stream_id} is already open"
            if reason is not None:
                logger.warning("a data-channel open request was dropped: %s", reason)
                return
        await deliver(stream_id, pp_id, data)

    transport._receive_data_chunk = receive_data_chunk
    transport._receive = receive
    return True
