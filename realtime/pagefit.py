"""Upstream events too big for the page's data channel, made to fit.

A data-channel message is capped by what the page's SDP advertises (Chrome: 256
KiB), and aiortc refuses to send a larger one. An upstream may send more than
that in one event (a long transcript, a huge tool-call argument). Streamed text
(`*.delta` events) is split into several deltas that add up to the same text, so
captions keep working; any other event has its longest strings cut, with a marker,
until it fits; what still cannot fit becomes an `error` event saying so.
"""

from __future__ import annotations

import copy
from typing import Any

from . import events
from .events import ErrorCode, Event

#: Room kept for the rest of the event and JSON escaping.
_HEADROOM = 1024
TRUNCATED = " … [truncated to fit the data channel]"


def _size(event: Event) -> int:
    return len(events.dumps(event).encode())


def fit_for_page(event: Event, limit: int) -> list[Event]:
    """`event` as one or more events, each at most `limit` bytes as JSON."""
    if _size(event) <= limit:
        return [event]
    delta = event.get("delta")
    if isinstance(event.get("type"), str) and event["type"].endswith(".delta") and isinstance(delta, str):
        rest = _size({**event, "delta": ""})
        # JSON may escape a character to 6 bytes (\\uXXXX) or UTF-8 to 4: stay safe.
        step = max(1, (limit - rest - _HEADROOM) // 6)
        if rest + _HEADROOM < limit:
            return [{**event, "delta": delta[i:i + step]} for i in range(0, len(delta), step)]
    cut = copy.deepcopy(event)
    for _ in range(50):
        path = _longest_string(cut)
        if path is None:
            break
        parent, key, value = path
        keep = max(0, len(value) - max(len(value) // 2, (_size(cut) - limit) + _HEADROOM))
        parent[key] = value[:keep] + TRUNCATED
        if _size(cut) <= limit:
            return [cut]
    return [events.error(
        f"A {event.get('type')!s:.80} event of {_size(event)} bytes from the model is larger than this page accepts "
        f"({limit} bytes) and was dropped.", code=ErrorCode.MESSAGE_TOO_LARGE, type="server_error")]


def _longest_string(obj: Any) -> tuple[Any, Any, str] | None:
    best: tuple[Any, Any, str] | None = None
    stack = [obj]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            if isinstance(value, str):
                if len(value) > 64 and (best is None or len(value) > len(best[2])) and key != "type":
                    best = (node, key, value)
            elif isinstance(value, (dict, list)):
                stack.append(value)
    return best
