"""What a page may send upstream over `oai-events`.

The page is not trusted with the upstream session: only allowlisted event types
pass, and a `session.update` keeps only the fields the operator allows. A
`session.update` with extra fields is still forwarded without them, because stock
clients wait for `session.updated`; the page is told what was dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np

from . import events
from .events import Client, ErrorCode, Event

MAX_CLIENT_EVENT_BYTES = 128 * 1024
#: Deepest nesting of objects/arrays accepted (OpenAI's events need 6 or so).
MAX_DEPTH = 32
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')


def nesting_depth(message: bytes) -> int:
    """How deep objects and arrays nest in a JSON text, found without parsing it (a deep
    document would exhaust the parser's recursion before any check could run)."""
    bare = np.frombuffer(_STRINGS.sub(b'""', message), dtype=np.uint8)
    step = np.isin(bare, (0x5B, 0x7B)).astype(np.int32) - np.isin(bare, (0x5D, 0x7D)).astype(np.int32)
    return int(np.cumsum(step).max()) if step.size else 0


@dataclass
class Verdict:
    forward: Optional[Event] = None  # the event to act on / send upstream, if any
    errors: list[Event] = field(default_factory=list)  # `error` events for the page


class ClientEventPolicy:
    def __init__(self, allowed_events: Iterable[str], allowed_session_fields: Iterable[str]) -> None:
        self.allowed_events = frozenset(allowed_events)
        self.allowed_fields = frozenset(allowed_session_fields)

    def check(self, message: str | bytes) -> Verdict:
        if len(message) > MAX_CLIENT_EVENT_BYTES:
            return Verdict(errors=[events.error(
                f"Client event of {len(message)} bytes exceeds the limit of {MAX_CLIENT_EVENT_BYTES} bytes.",
                code=ErrorCode.MESSAGE_TOO_LARGE)])
        raw = message.encode("utf-8", "surrogatepass") if isinstance(message, str) else message
        if nesting_depth(raw) > MAX_DEPTH:
            return Verdict(errors=[events.error(
                f"Client event nests deeper than {MAX_DEPTH} levels.", code=ErrorCode.INVALID_JSON)])
        try:
            event = json.loads(message)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return Verdict(errors=[events.error(f"Invalid JSON in client event: {exc}", code=ErrorCode.INVALID_JSON)])
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return Verdict(errors=[events.error(
                "Client event must be a JSON object with a string 'type'.",
                code=ErrorCode.MISSING_PARAMETER, param="type")])
        kind, client_id = event["type"], event.get("event_id")
        if kind not in self.allowed_events:
            known = "unknown" if kind not in events.CLIENT_EVENT_TYPES else "not allowed"
            return Verdict(errors=[events.error(
                f"Client event type '{kind}' is {known} on this server; allowed: {', '.join(sorted(self.allowed_events))}.",
                code=ErrorCode.UNKNOWN_EVENT if known == "unknown" else ErrorCode.EVENT_NOT_ALLOWED,
                param="type", client_event_id=client_id)])
        if kind == Client.SESSION_UPDATE:
            return self._check_session_update(event)
        return Verdict(forward=event)

    def _check_session_update(self, event: Event) -> Verdict:
        session = event.get("session")
        if not isinstance(session, dict):
            return Verdict(errors=[events.error(
                "session.update needs a 'session' object.", code=ErrorCode.MISSING_PARAMETER,
                param="session", client_event_id=event.get("event_id"))])
        kept, dropped = self._filter(session, "")
        event = {**event, "session": kept}
        verdict = Verdict(forward=event)
        if dropped:
            verdict.errors.append(events.error(
                "session.update fields not allowed by this server were dropped: " + ", ".join(dropped) + ".",
                code=ErrorCode.SESSION_FIELDS_DROPPED, param="session." + dropped[0],
                client_event_id=event.get("event_id")))
        return verdict

    def _filter(self, obj: dict[str, Any], prefix: str) -> tuple[dict[str, Any], list[str]]:
        kept: dict[str, Any] = {}
        dropped: list[str] = []
        for key, value in obj.items():
            path = prefix + key
            if path in self.allowed_fields:
                kept[key] = value
            elif isinstance(value, dict) and any(f.startswith(path + ".") for f in self.allowed_fields):
                sub_kept, sub_dropped = self._filter(value, path + ".")
                if sub_kept:
                    kept[key] = sub_kept
                dropped += sub_dropped
            else:
                dropped.append(path)
        return kept, dropped
