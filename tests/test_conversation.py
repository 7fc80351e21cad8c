"""The conversation core with no sockets and no sleeps: barge-in, truncation, relay order,
pruning, history. The playback is the real PlaybackTrack on a hand-driven clock."""

from __future__ import annotations

import base64

from media.playback import PlaybackTrack, pcm_frame
from realtime.conversation import (Conversation, Cut, EndOfAudio, FlushPlayback, Forget, Play, ToPage,
                                   ToUpstream)

FRAME = 480 * 2  # 20 ms of 24 kHz PCM16


class Shell:
    """What `Call.execute` does, minus the sockets: upstream and page are lists."""

    def __init__(self) -> None:
        self.core = Conversation()
        self.now = 0.0
        self.track = PlaybackTrack(clock=lambda: self.now, sleep=self._sleep, frames=pcm_frame)
        self.track.on_started = lambda item: self.run(self.core.playback_started(item))
        self.track.on_stopped = lambda item: self.run(self.core.playback_stopped(item))
        self.upstream: list[dict] = []
        self.page: list[dict] = []
        self.log: list[tuple[str, str]] = []  # (where, type) in the order things left

    async def _sleep(self, seconds: float) -> None:
        self.now += seconds

    def run(self, actions) -> None:
        for a in actions:
            if isinstance(a, ToUpstream):
                self.upstream.append(a.event)
                self.log.append(("upstream", a.event["type"]))
            elif isinstance(a, ToPage):
                self.page.append(a.event)
                self.log.append(("page", a.event["type"]))
            elif isinstance(a, Play):
                self.track.enqueue(a.item_id, a.pcm)
            elif isinstance(a, EndOfAudio):
                self.track.end_of_audio()
            elif isinstance(a, FlushPlayback):
                self.run(self.core.flushed([Cut(p.item_id, p.audio_end_ms) for p in self.track.flush()]))
            elif isinstance(a, Forget):
                self.track.forget(a.item_id)

    def up(self, event: dict) -> None:
        self.run(self.core.from_upstream(event))

    def from_page(self, event: dict) -> None:
        self.run(self.core.from_page(event))

    async def play(self, frames: int) -> None:
        for _ in range(frames):
            await self.track.recv()

    def types(self, where: list[dict]) -> list[str]:
        return [e["type"] for e in where]


def delta(rid: str, item: str, frames: int) -> dict:
    return {"type": "response.output_audio.delta", "response_id": rid, "item_id": item,
            "delta": base64.b64encode(b"\x01\x00" * (FRAME // 2) * frames).decode()}


async def test_barge_in_truncates_at_what_was_played_and_drops_the_late_audio():
    s = Shell()
    s.up({"type": "response.created", "response": {"id": "r1"}})
    s.up(delta("r1", "i1", 50))  # 1 s of audio buffered
    await s.play(16)  # 16 frames = 320 ms of i1 reach the encoder
    played = s.track.playout("i1").played_ms
    s.up({"type": "input_audio_buffer.speech_started", "item_id": "u1"})
    truncates = [e for e in s.upstream if e["type"] == "conversation.item.truncate"]
    assert truncates == [{**truncates[0], "item_id": "i1", "content_index": 0, "audio_end_ms": played}]
    assert played == 320
    # order: the truncate goes up and the page hears "cleared" before it sees the speech start
    assert s.log[-3:] == [("upstream", "conversation.item.truncate"), ("page", "output_audio_buffer.cleared"),
                          ("page", "input_audio_buffer.speech_started")]
    assert s.track.buffered_ms == 0
    s.up(delta("r1", "i1", 10))  # late audio of the interrupted response
    s.up(delta("r1", "i2", 10))  # even a new item of it
    assert s.track.buffered_ms == 0
    s.up({"type": "response.done", "response": {"id": "r1"}})
    assert s.core.tracked == {"responses": 0, "items": 0, "cut_items": 0}
    assert s.core.active_response is None


async def test_started_and_stopped_once_per_response_then_pruned():
    s = Shell()
    s.up({"type": "response.created", "response": {"id": "r1"}})
    s.up(delta("r1", "i1", 3))
    s.up(delta("r1", "i1", 2))
    s.up({"type": "response.done", "response": {"id": "r1"}})  # done before it is played
    assert s.core.tracked["responses"] == 1  # its audio is still to play
    await s.play(8)
    kinds = s.types(s.page)
    assert kinds.count("output_audio_buffer.started") == 1 and kinds.count("output_audio_buffer.stopped") == 1
    assert kinds.index("output_audio_buffer.started") < kinds.index("output_audio_buffer.stopped")
    started = next(e for e in s.page if e["type"] == "output_audio_buffer.started")
    assert started["response_id"] == "r1"
    assert s.core.tracked == {"responses": 0, "items": 0, "cut_items": 0}
    assert s.track.playout("i1") is None  # the playback forgot it too


async def test_with_interrupt_response_false_speech_does_not_cut_but_the_page_can():
    s = Shell()
    s.up({"type": "session.updated", "session": {"audio": {"input": {"turn_detection": {
        "type": "server_vad", "interrupt_response": False}}}}})
    s.up({"type": "response.created", "response": {"id": "r1"}})
    s.up(delta("r1", "i1", 20))
    await s.play(5)
    s.up({"type": "input_audio_buffer.speech_started", "item_id": "u1"})
    assert not [e for e in s.upstream if e["type"] == "conversation.item.truncate"]
    assert s.track.buffered_ms > 0
    await s.play(5)
    played = s.track.playout("i1").played_ms
    assert played == 200
    s.from_page({"type": "output_audio_buffer.clear"})  # never forwarded: the bridge owns playback
    assert [e["type"] for e in s.upstream] == ["conversation.item.truncate"]
    assert s.upstream[0]["audio_end_ms"] == played


async def test_other_page_events_go_upstream_unchanged_and_in_order():
    s = Shell()
    events = [{"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                              "content": [{"type": "input_text", "text": "hi"}]}},
              {"type": "response.create"}, {"type": "response.cancel"}]
    for e in events:
        s.from_page(e)
    assert s.upstream == events


async def test_many_turns_leave_no_bookkeeping_behind():
    s = Shell()
    for n in range(100):
        rid, item = f"r{n}", f"i{n}"
        s.up({"type": "response.created", "response": {"id": rid}})
        s.up(delta(rid, item, 2))
        if n % 3 == 0:  # every third one interrupted
            await s.play(2)
            s.up({"type": "input_audio_buffer.speech_started", "item_id": f"u{n}"})
            s.up({"type": "response.done", "response": {"id": rid}})
        else:
            s.up({"type": "response.done", "response": {"id": rid}})
            await s.play(4)
        if n % 10 == 0:  # a text-only response too
            s.up({"type": "response.created", "response": {"id": f"t{n}"}})
            s.up({"type": "response.done", "response": {"id": f"t{n}"}})
    assert s.core.tracked == {"responses": 0, "items": 0, "cut_items": 0}
    assert not s.track._items  # noqa: SLF001 - the playback's per-item accounting is gone too


def test_the_conversation_is_kept_as_text_in_order():
    core = Conversation()
    core.from_upstream({"type": "conversation.item.input_audio_transcription.completed", "item_id": "u1",
                        "transcript": "What's the weather?"})
    core.from_upstream({"type": "response.output_item.done", "item": {
        "id": "f1", "type": "function_call", "name": "weather", "call_id": "c1", "arguments": "{\"city\":\"Oslo\"}"}})
    core.from_page({"type": "conversation.item.create", "item": {
        "type": "function_call_output", "call_id": "c1", "output": "{\"temp\":3}"}})
    core.from_upstream({"type": "response.output_audio_transcript.done", "item_id": "a1",
                        "transcript": "It is three degrees in Oslo."})
    assert [(h.kind, h.text) for h in core.history] == [
        ("user", "What's the weather?"), ("function_call", "{\"city\":\"Oslo\"}"),
        ("function_call_output", "{\"temp\":3}"), ("assistant", "It is three degrees in Oslo.")]
    assert core.history[1].name == "weather" and core.history[1].call_id == "c1"
    assert core.history[2].call_id == "c1"
