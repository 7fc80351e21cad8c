"""The Realtime protocol (GA shape): every event-type string and event builder lives here.

Nothing else in the project spells an event type. A server that still speaks the
beta dialect is handled by `normalize_server_event`, a mapping table, not a
second code path.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any, Optional

Event = dict[str, Any]


class Client:
    """Client → server event types."""

    SESSION_UPDATE = "session.update"
    INPUT_AUDIO_APPEND = "input_audio_buffer.append"
    INPUT_AUDIO_COMMIT = "input_audio_buffer.commit"
    INPUT_AUDIO_CLEAR = "input_audio_buffer.clear"
    ITEM_CREATE = "conversation.item.create"
    ITEM_RETRIEVE = "conversation.item.retrieve"
    ITEM_TRUNCATE = "conversation.item.truncate"
    ITEM_DELETE = "conversation.item.delete"
    RESPONSE_CREATE = "response.create"
    RESPONSE_CANCEL = "response.cancel"
    OUTPUT_AUDIO_CLEAR = "output_audio_buffer.clear"


class Server:
    """Server → client event types."""

    ERROR = "error"
    SESSION_CREATED = "session.created"
    SESSION_UPDATED = "session.updated"
    ITEM_ADDED = "conversation.item.added"
    ITEM_DONE = "conversation.item.done"
    ITEM_RETRIEVED = "conversation.item.retrieved"
    ITEM_DELETED = "conversation.item.deleted"
    ITEM_TRUNCATED = "conversation.item.truncated"
    INPUT_TRANSCRIPTION_DELTA = "conversation.item.input_audio_transcription.delta"
    INPUT_TRANSCRIPTION_COMPLETED = "conversation.item.input_audio_transcription.completed"
    INPUT_TRANSCRIPTION_FAILED = "conversation.item.input_audio_transcription.failed"
    INPUT_COMMITTED = "input_audio_buffer.committed"
    INPUT_CLEARED = "input_audio_buffer.cleared"
    SPEECH_STARTED = "input_audio_buffer.speech_started"
    SPEECH_STOPPED = "input_audio_buffer.speech_stopped"
    INPUT_TIMEOUT = "input_audio_buffer.timeout_triggered"
    OUTPUT_AUDIO_STARTED = "output_audio_buffer.started"
    OUTPUT_AUDIO_STOPPED = "output_audio_buffer.stopped"
    OUTPUT_AUDIO_CLEARED = "output_audio_buffer.cleared"
    RESPONSE_CREATED = "response.created"
    RESPONSE_DONE = "response.done"
    OUTPUT_ITEM_ADDED = "response.output_item.added"
    OUTPUT_ITEM_DONE = "response.output_item.done"
    CONTENT_PART_ADDED = "response.content_part.added"
    CONTENT_PART_DONE = "response.content_part.done"
    OUTPUT_TEXT_DELTA = "response.output_text.delta"
    OUTPUT_TEXT_DONE = "response.output_text.done"
    OUTPUT_AUDIO_DELTA = "response.output_audio.delta"
    OUTPUT_AUDIO_DONE = "response.output_audio.done"
    OUTPUT_TRANSCRIPT_DELTA = "response.output_audio_transcript.delta"
    OUTPUT_TRANSCRIPT_DONE = "response.output_audio_transcript.done"
    FUNCTION_ARGS_DELTA = "response.function_call_arguments.delta"
    FUNCTION_ARGS_DONE = "response.function_call_arguments.done"
    RATE_LIMITS_UPDATED = "rate_limits.updated"


class ErrorCode:
    """Error codes used by this project (the first group are OpenAI's own)."""

    COMMIT_EMPTY = "input_audio_buffer_commit_empty"
    ACTIVE_RESPONSE = "conversation_already_has_active_response"
    CANCEL_NOT_ACTIVE = "response_cancel_not_active"
    MISSING_PARAMETER = "missing_required_parameter"
    INVALID_VALUE = "invalid_value"
    INVALID_JSON = "invalid_json"
    UNKNOWN_EVENT = "unknown_event_type"
    ITEM_NOT_FOUND = "item_not_found"
    MESSAGE_TOO_LARGE = "message_too_large"
    # Bridge-specific
    EVENT_NOT_ALLOWED = "event_not_allowed"
    INVALID_UTF8 = "invalid_utf8"
    SESSION_FIELDS_DROPPED = "session_fields_not_allowed"
    UPSTREAM_CLOSED = "upstream_closed"
    UPSTREAM_ERROR = "upstream_error"
    CALL_ENDED = "call_ended"


# Beta dialect → GA names. Some Realtime-compatible servers still send these.
BETA_TO_GA: dict[str, str] = {
    "response.audio.delta": Server.OUTPUT_AUDIO_DELTA,
    "response.audio.done": Server.OUTPUT_AUDIO_DONE,
    "response.audio_transcript.delta": Server.OUTPUT_TRANSCRIPT_DELTA,
    "response.audio_transcript.done": Server.OUTPUT_TRANSCRIPT_DONE,
    "response.text.delta": Server.OUTPUT_TEXT_DELTA,
    "response.text.done": Server.OUTPUT_TEXT_DONE,
    "conversation.item.created": Server.ITEM_ADDED,
}

CLIENT_EVENT_TYPES = frozenset(v for k, v in vars(Client).items() if k.isupper())
SERVER_EVENT_TYPES = frozenset(v for k, v in vars(Server).items() if k.isupper())


def new_id(prefix: str) -> str:
    """An OpenAI-style id: `prefix_` + 22 url-safe characters."""
    return f"{prefix}_{uuid.uuid4().hex[:22]}"


def loads_type(message: str) -> Optional[str]:
    """The `type` of a serialised event (None if it has none)."""
    try:
        event = json.loads(message)
    except ValueError:
        return None
    kind = event.get("type") if isinstance(event, dict) else None
    return kind if isinstance(kind, str) else None


def event_id() -> str:
    return new_id("event")


def dumps(event: Event) -> str:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


def normalize_server_event(event: Event) -> Event:
    """Rename beta-dialect server events to their GA names (in place, returned)."""
    renamed = BETA_TO_GA.get(event.get("type", ""))
    if renamed:
        event["type"] = renamed
    return event


#: For the server events the bridge acts on: field → the types it may have (None: absent or null).
_SHAPES: dict[str, dict[str, tuple[type, ...]]] = {
    Server.SESSION_CREATED: {"session": (dict,)},
    Server.SESSION_UPDATED: {"session": (dict,)},
    Server.RESPONSE_CREATED: {"response": (dict,)},
    Server.RESPONSE_DONE: {"response": (dict,)},
    Server.ERROR: {"error": (dict,)},
    Server.OUTPUT_AUDIO_DELTA: {"delta": (str,), "item_id": (str,), "response_id": (str,)},
    Server.SPEECH_STARTED: {"item_id": (str,)},
    # kept as the conversation's text (replayed to a new upstream session)
    Server.ITEM_ADDED: {"item": (dict,)},
    Server.ITEM_DONE: {"item": (dict,)},
    Server.OUTPUT_ITEM_DONE: {"item": (dict,)},
    "conversation.item.input_audio_transcription.completed": {"item_id": (str,), "transcript": (str,)},
    "response.output_audio_transcript.done": {"item_id": (str,), "transcript": (str,)},
    "response.output_text.done": {"item_id": (str,), "text": (str,)},
    "response.function_call_arguments.done": {"item_id": (str,), "arguments": (str,)},
}
_IDS = ("id",)


def shape_problem(event: Event) -> Optional[str]:
    """Why a server event the bridge acts on cannot be used as it is (None if it can)."""
    for name, types in _SHAPES.get(event["type"], {}).items():
        value = event.get(name)
        if value is not None and not isinstance(value, types):
            return f"'{name}' is {type(value).__name__}, not {types[0].__name__}"
        if isinstance(value, dict):
            for key in _IDS:
                if value.get(key) is not None and not isinstance(value[key], str):
                    return f"'{name}.{key}' is {type(value[key]).__name__}, not str"
    if event["type"] == Server.ERROR and isinstance(event.get("error"), dict):
        message = event["error"].get("message")
        if message is not None and not isinstance(message, str):
            return "'error.message' is not a string"
    return None


# -- builders ----------------------------------------------------------------


#: Longest error message sent (an error must always fit a data-channel message).
MAX_ERROR_MESSAGE = 2000


def error(
    message: str,
    *,
    code: Optional[str] = None,
    type: str = "invalid_request_error",
    param: Optional[str] = None,
    client_event_id: Optional[str] = None,
) -> Event:
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[:MAX_ERROR_MESSAGE - 20] + " … (truncated)"
    if param is not None and len(param) > 200:
        param = param[:200] + "…"
    return {
        "type": Server.ERROR,
        "event_id": event_id(),
        "error": {
            "type": type,
            "code": code,
            "message": message,
            "param": param,
            "event_id": client_event_id,
        },
    }


def input_audio_append(pcm: bytes) -> Event:
    return {"type": Client.INPUT_AUDIO_APPEND, "audio": base64.b64encode(pcm).decode("ascii")}


def truncate(item_id: str, audio_end_ms: int, content_index: int = 0) -> Event:
    return {
        "type": Client.ITEM_TRUNCATE,
        "event_id": event_id(),
        "item_id": item_id,
        "content_index": content_index,
        "audio_end_ms": audio_end_ms,
    }


def session_update(session: dict[str, Any]) -> Event:
    return {"type": Client.SESSION_UPDATE, "event_id": event_id(), "session": session}


def output_audio_buffer(kind: str, response_id: Optional[str]) -> Event:
    """`output_audio_buffer.started|stopped|cleared`, as OpenAI's WebRTC endpoint sends them."""
    return {"type": kind, "event_id": event_id(), "response_id": response_id}


def decode_audio_delta(event: Event) -> bytes:
    """The PCM of an audio delta; raises ValueError if it is not base64."""
    return base64.b64decode(event.get("delta") or "", validate=True)
