"""Upstream handoff: an upstream session that closes (OpenAI's 60-minute limit is code 1001)
or reaches its configured lifetime is replaced by a new one with the conversation replayed;
the page's view stays continuous. Real stub over WebSocket, real aiortc caller."""

from __future__ import annotations

import asyncio

from tests.conftest import connected_call, eventually


async def _one_turn(stub, session, caller) -> None:
    await session.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": "item_user_1",
                        "content_index": 0, "transcript": "What time is it?"})
    await stub.respond(session, ms=400, text="It is noon.")
    await caller.wait_event("response.done", 10)


def _creates(session) -> list[dict]:
    return [e["item"] for e in session.events_of("conversation.item.create")]


async def test_a_session_closed_with_1001_is_replaced_and_the_conversation_replayed(bridge, stub, new_caller):
    caller, first = await connected_call(bridge, stub, new_caller, freq=300)
    await _one_turn(stub, first, caller)
    before = {k: len(caller.events_of(k)) for k in ("session.created", "session.updated", "conversation.item.added")}
    await first.ws.close(1001, "Your session hit the maximum duration of 60 minutes.")
    await eventually(lambda: len(stub.sessions) == 2, 10, "a new upstream session")
    second = stub.sessions[1]
    await eventually(lambda: len(_creates(second)) == 2, 10, "the conversation replayed")
    user, assistant = _creates(second)
    assert user["id"] == "item_user_1" and user["role"] == "user"
    assert user["content"] == [{"type": "input_text", "text": "What time is it?"}]
    assert assistant["role"] == "assistant" and assistant["content"][0]["text"] == "It is noon."
    assert second.events_of("session.update"), "the new session was configured like the first"
    call = bridge.registry.calls[caller.call_id]
    await eventually(lambda: call._replay is None, 10, "the replay acknowledged")  # noqa: SLF001
    await asyncio.sleep(0.3)
    # the page saw one session.updated for the change, and nothing of the replay
    assert len(caller.events_of("session.created")) == before["session.created"]
    assert len(caller.events_of("session.updated")) == before["session.updated"] + 1
    assert len(caller.events_of("conversation.item.added")) == before["conversation.item.added"]
    assert not [e for e in caller.events if e.get("type") == "error"]
    # audio reaches the new session, and barge-in still truncates exactly
    heard = len(second.audio)
    await eventually(lambda: len(second.audio) > heard + 24000, 10, "the caller's audio upstream again")
    stub.realtime_pacing = True
    reply = asyncio.create_task(stub.respond(second, ms=3000, text="A long answer."))
    await eventually(lambda: len(caller.audio) > 48000 * 2 * 1.0, 10, "a second of the new reply heard")
    await stub.speech_started(second)
    await eventually(lambda: second.truncations, 5, "a truncate to the new session")
    truncate = second.truncations[-1]
    assert 0 < truncate["audio_end_ms"] <= second.item_audio_ms[truncate["item_id"]]
    await reply
    assert call.handoffs == 1 and call.reason is None


async def test_a_session_is_replaced_between_turns_before_its_lifetime_ends(stub, start_bridge, new_caller):
    bridge = await start_bridge(stub.url, upstream_session_lifetime="3")
    caller, first = await connected_call(bridge, stub, new_caller, freq=300)
    stub.realtime_pacing = True
    reply = asyncio.create_task(stub.respond(first, ms=3500, text="Spoken across the lifetime."))
    await asyncio.sleep(3.2)  # the lifetime has run out mid-response: the handoff waits for the turn to end
    assert len(stub.sessions) == 1
    await reply
    await eventually(lambda: len(stub.sessions) == 2, 10, "a new session after the turn")
    await eventually(lambda: first.ws.state.name == "CLOSED", 5, "the old session closed by the bridge")
    second = stub.sessions[1]
    await eventually(lambda: any(i.get("role") == "assistant" for i in _creates(second)), 10, "the replay")
    call = bridge.registry.calls[caller.call_id]
    assert call.reason is None and call.handoffs == 1
    statuses = [e["response"]["status"] for e in caller.events_of("response.done")]
    assert statuses == ["completed"]  # the response was never cut by the handoff


async def test_when_the_new_session_fails_the_call_ends_with_the_reason(bridge, stub, new_caller):
    caller, first = await connected_call(bridge, stub, new_caller)
    stub.refuse_status = 503
    await first.ws.close(1011, "internal error")
    err = await caller.wait_event("error", 10)
    assert err["error"]["code"] in ("call_ended", "upstream_closed")
    assert "new upstream session failed" in err["error"]["message"]
    await bridge.wait_no_calls()


async def test_a_normal_close_is_not_handed_off(bridge, stub, new_caller):
    caller, first = await connected_call(bridge, stub, new_caller)
    await first.ws.close(1000, "bye")
    err = await caller.wait_event("error", 10)
    assert "code 1000" in err["error"]["message"]
    await bridge.wait_no_calls()
    assert len(stub.sessions) == 1


async def test_a_session_lost_mid_answer_is_replaced_and_the_new_one_answers_again(bridge, stub, new_caller):
    caller, first = await connected_call(bridge, stub, new_caller, freq=300)
    await first.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": "item_user_1",
                      "content_index": 0, "transcript": "Tell me a long story."})
    stub.realtime_pacing = True
    reply = asyncio.create_task(stub.respond(first, ms=6000, text="Once upon a time there was a bridge."))
    await caller.wait_event("output_audio_buffer.started", 10)
    await asyncio.sleep(0.5)
    await first.ws.close(1011, "internal server error")  # gone mid-answer
    await asyncio.gather(reply, return_exceptions=True)
    await eventually(lambda: len(stub.sessions) == 2, 10, "a new upstream session")
    second = stub.sessions[1]
    # the page is told the cut-off answer ended, and its buffered rest is dropped
    done = await caller.wait_event("response.done", 10)
    assert done["response"]["status"] == "incomplete"
    assert done["response"]["status_details"]["reason"] == "upstream_session_replaced"
    assert caller.events_of("output_audio_buffer.cleared")
    # the new session gets the conversation, then is asked to answer again: the caller hears an answer
    await eventually(lambda: second.events_of("response.create"), 10, "response.create to the new session")
    kinds = [e["type"] for e in second.received]
    assert kinds.index("response.create") > max(i for i, k in enumerate(kinds) if k == "conversation.item.create")
    assert _creates(second)[0]["content"][0]["text"] == "Tell me a long story."
    await eventually(lambda: len(caller.events_of("response.done")) >= 2, 15, "the new answer done")
    assert caller.events_of("response.done")[-1]["response"]["status"] == "completed"
    call = bridge.registry.calls[caller.call_id]
    assert call.conversation.active_response is None and call.reason is None
    assert call.conversation.tracked["responses"] == 0  # nothing of the lost answer kept
