"""Unit: what a page may send upstream over oai-events."""

import json

from realtime.events import normalize_server_event
from realtime.policy import MAX_CLIENT_EVENT_BYTES, ClientEventPolicy
from settings import DEFAULT_CLIENT_EVENTS, DEFAULT_SESSION_FIELDS

policy = ClientEventPolicy(DEFAULT_CLIENT_EVENTS, DEFAULT_SESSION_FIELDS)


def check(event):
    return policy.check(json.dumps(event) if not isinstance(event, str) else event)


def test_allowlisted_events_are_forwarded_unchanged():
    for kind in ("response.create", "response.cancel", "conversation.item.create", "input_audio_buffer.clear"):
        v = check({"type": kind, "event_id": "e1"})
        assert v.forward == {"type": kind, "event_id": "e1"} and not v.errors


def test_an_event_outside_the_policy_gets_an_error_naming_it_and_is_not_forwarded():
    v = check({"type": "input_audio_buffer.append", "audio": "AAAA", "event_id": "evt_7"})
    assert v.forward is None
    (err,) = v.errors
    assert err["type"] == "error"
    assert err["error"]["code"] == "event_not_allowed"
    assert "input_audio_buffer.append" in err["error"]["message"]
    assert err["error"]["event_id"] == "evt_7"


def test_unknown_event_types_and_invalid_json_get_errors():
    assert check({"type": "bogus.event"}).errors[0]["error"]["code"] == "unknown_event_type"
    v = check("{not json")
    assert v.forward is None and v.errors[0]["error"]["code"] == "invalid_json"
    assert check("[1,2]").errors[0]["error"]["code"] == "missing_required_parameter"


def test_oversized_client_events_are_refused():
    v = check({"type": "conversation.item.create", "pad": "x" * MAX_CLIENT_EVENT_BYTES})
    assert v.forward is None and v.errors[0]["error"]["code"] == "message_too_large"


def test_session_update_keeps_allowed_fields_and_drops_the_rest_with_an_error_naming_them():
    v = check({"type": "session.update", "session": {
        "type": "realtime",
        "instructions": "be brief",
        "model": "gpt-4o-mini-realtime",
        "audio": {"input": {"format": {"type": "audio/pcmu"}, "turn_detection": {"type": "semantic_vad"}},
                  "output": {"voice": "marin"}},
    }})
    assert v.forward["session"] == {
        "type": "realtime", "instructions": "be brief",
        "audio": {"input": {"turn_detection": {"type": "semantic_vad"}}, "output": {"voice": "marin"}},
    }
    (err,) = v.errors
    assert err["error"]["code"] == "session_fields_not_allowed"
    assert "model" in err["error"]["message"] and "audio.input.format" in err["error"]["message"]


def test_a_session_update_with_only_allowed_fields_passes_silently():
    v = check({"type": "session.update", "session": {"instructions": "x"}})
    assert v.forward["session"] == {"instructions": "x"} and not v.errors


def test_the_operator_can_narrow_the_policy():
    strict = ClientEventPolicy(["response.create"], ["instructions"])
    assert strict.check(json.dumps({"type": "session.update", "session": {}})).errors[0]["error"]["code"] == "event_not_allowed"


def test_beta_dialect_events_are_renamed_to_ga():
    assert normalize_server_event({"type": "response.audio.delta"})["type"] == "response.output_audio.delta"
    assert normalize_server_event({"type": "response.audio_transcript.done"})["type"] == "response.output_audio_transcript.done"
    assert normalize_server_event({"type": "conversation.item.created"})["type"] == "conversation.item.added"
    assert normalize_server_event({"type": "session.updated"})["type"] == "session.updated"
