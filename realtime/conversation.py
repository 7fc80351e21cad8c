"""The conversation rules of one call, without sockets, tasks or clocks.

In the manner of h11 or python-websockets' `protocol.py`: a `Conversation` takes
what happened (an upstream event, a page event that passed the policy, playback
starting, stopping or being flushed) and returns what to do about it, as a list
of actions the asyncio shell (`realtime/call.py`) carries out in order. It owns:

- which item belongs to which response, and which response is active;
- barge-in: when the user speaks over the model (or the page sends
  `output_audio_buffer.clear`), playback is flushed and each cut item is
  truncated upstream at exactly what was played; the interrupted response's
  late audio is dropped;
- OpenAI's `output_audio_buffer.started/stopped/cleared` events to the page;
- whether speech interrupts a response (`turn_detection.interrupt_response`);
- the conversation so far as text (user and assistant transcripts, function
  calls and their outputs), for a new upstream session to be given.

What ended is pruned: a response's bookkeeping goes once it is done and its
audio has stopped or been cut.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from . import events
from .events import Client, Event, Server

#: Items remembered for a new upstream session (older ones are dropped first).
MAX_HISTORY_ITEMS = 500


@dataclass(frozen=True)
class ToUpstream:
    event: Event


@dataclass(frozen=True)
class ToPage:
    event: Event


@dataclass(frozen=True)
class Play:
    """Queue model audio (24 kHz PCM16 mono) for an item."""

    item_id: str
    pcm: bytes


@dataclass(frozen=True)
class EndOfAudio:
    """No more audio is coming for now."""


@dataclass(frozen=True)
class FlushPlayback:
    """Drop what is not yet played and hand the cut items to `Conversation.flushed`."""


@dataclass(frozen=True)
class Forget:
    """Drop the playout accounting of an item nobody will truncate any more."""

    item_id: str


Action = Union[ToUpstream, ToPage, Play, EndOfAudio, FlushPlayback, Forget]


@dataclass
class Cut:
    """What the playback reports for an item it flushed."""

    item_id: str
    audio_end_ms: int


@dataclass
class HistoryItem:
    """One conversation item as text, in the order it happened."""

    id: str
    kind: str  # "user", "assistant", "function_call", "function_call_output"
    text: str = ""
    call_id: str = ""
    name: str = ""
    truncated: bool = False


@dataclass
class _Response:
    id: str
    items: list[str] = field(default_factory=list)
    done: bool = False
    started: bool = False  # output_audio_buffer.started sent
    cut: bool = False


class Conversation:
    def __init__(self) -> None:
        self._responses: dict[str, _Response] = {}
        self._item_response: dict[str, Optional[str]] = {}
        self._cut_items: set[str] = set()
        self.active_response: Optional[str] = None
        self.interrupt_response = True
        self.history: deque[HistoryItem] = deque(maxlen=MAX_HISTORY_ITEMS)
        self._history_index: dict[str, HistoryItem] = {}
        self.malformed_audio = 0

    # -- inputs ------------------------------------------------------------------

    def from_upstream(self, event: Event) -> list[Action]:
        """An upstream event whose shape has been checked (`events.shape_problem`)."""
        kind = event.get("type")
        if kind == Server.OUTPUT_AUDIO_DELTA:
            return self._audio_delta(event)  # audio travels on RTP, never to the page
        actions: list[Action] = []
        if kind == Server.RESPONSE_CREATED:
            rid = (event.get("response") or {}).get("id")
            if isinstance(rid, str):
                self._responses.setdefault(rid, _Response(rid))
                self.active_response = rid
        elif kind == Server.RESPONSE_DONE:
            rid = (event.get("response") or {}).get("id")
            if rid == self.active_response:
                self.active_response = None
            response = self._responses.get(rid) if isinstance(rid, str) else None
            if response is not None:
                response.done = True
            actions.append(EndOfAudio())
            # with audio still to play, its bookkeeping goes when playback stops (or is cut)
            if response is not None and (response.cut or not response.items):
                actions += self._prune(response)
        elif kind == Server.SPEECH_STARTED:
            if self.interrupt_response:
                actions += self.barge_in()
        elif kind in (Server.SESSION_CREATED, Server.SESSION_UPDATED):
            self._note_session(event.get("session") or {})
        self._remember(event)
        actions.append(ToPage(event))
        return actions

    def from_page(self, event: Event) -> list[Action]:
        """A page event the policy let through."""
        if event.get("type") == Client.OUTPUT_AUDIO_CLEAR:
            # As OpenAI's WebRTC endpoint: the bridge owns playback, so it clears it.
            return self.barge_in()
        if event.get("type") == Client.ITEM_CREATE:
            self._remember_created(event.get("item"))
        return [ToUpstream(event)]

    def barge_in(self) -> list[Action]:
        """Stop playback now; `flushed` says what to tell the upstream once it has."""
        if self.active_response and self.active_response in self._responses:
            self._responses[self.active_response].cut = True
        return [FlushPlayback()]

    def flushed(self, cut: list[Cut]) -> list[Action]:
        """The playback dropped these items' unplayed audio: truncate each at what was played."""
        actions: list[Action] = []
        response_ids: list[Optional[str]] = []
        for c in cut:
            self._cut_items.add(c.item_id)
            actions.append(ToUpstream(events.truncate(c.item_id, c.audio_end_ms)))
            item = self._history_index.get(c.item_id)
            if item is not None:
                item.truncated = True
            rid = self._item_response.get(c.item_id)
            if rid not in response_ids:
                response_ids.append(rid)
            actions.append(Forget(c.item_id))
        for rid in response_ids:
            response = self._responses.get(rid) if rid else None
            if response is not None:
                response.cut = True
            actions.append(ToPage(events.output_audio_buffer(Server.OUTPUT_AUDIO_CLEARED, rid)))
            if response is not None and response.done:
                actions += self._prune(response)
        return actions

    def playback_started(self, item_id: str) -> list[Action]:
        rid = self._item_response.get(item_id)
        response = self._responses.get(rid) if rid else None
        if response is not None:
            if response.started:
                return []
            response.started = True
        return [ToPage(events.output_audio_buffer(Server.OUTPUT_AUDIO_STARTED, rid))]

    def playback_stopped(self, item_id: str) -> list[Action]:
        rid = self._item_response.get(item_id)
        actions: list[Action] = [ToPage(events.output_audio_buffer(Server.OUTPUT_AUDIO_STOPPED, rid))]
        response = self._responses.get(rid) if rid else None
        if response is not None:
            response.started = False  # a later part of it (after a pause) announces itself again
            if response.done:
                actions += self._prune(response)
                return actions
        for item, r in list(self._item_response.items()):
            if r == rid and item not in self._cut_items:
                actions.append(Forget(item))
        return actions

    def replay(self) -> list[Event]:
        """The conversation so far as `conversation.item.create` events, for a new upstream
        session (text only: audio is not replayed), with the items' own ids."""
        out: list[Event] = []
        for h in self.history:
            if h.kind in ("user", "assistant"):
                if not h.text:
                    continue
                part = "input_text" if h.kind == "user" else "output_text"
                item: dict[str, Any] = {"type": "message", "role": h.kind, "content": [{"type": part, "text": h.text}]}
            elif h.kind == "function_call":
                item = {"type": "function_call", "call_id": h.call_id, "name": h.name, "arguments": h.text}
            else:
                item = {"type": "function_call_output", "call_id": h.call_id, "output": h.text}
            item["id"] = h.id[:32]
            out.append({"type": Client.ITEM_CREATE, "event_id": events.event_id(), "item": item})
        return out

    # -- what the core holds -------------------------------------------------------

    @property
    def tracked(self) -> dict[str, int]:
        """Sizes of the bookkeeping (for tests and metrics): all of it shrinks as turns end."""
        return {"responses": len(self._responses), "items": len(self._item_response), "cut_items": len(self._cut_items)}

    # -- internals ---------------------------------------------------------------

    def _audio_delta(self, event: Event) -> list[Action]:
        item_id = event.get("item_id") or "unknown"
        rid = event.get("response_id")
        response = self._responses.get(rid) if isinstance(rid, str) else None
        if item_id in self._cut_items or (response is not None and response.cut):
            return []  # the user interrupted this response: its late audio is stale
        try:
            pcm = events.decode_audio_delta(event)
        except ValueError:  # binascii.Error is a ValueError
            self.malformed_audio += 1
            return []
        if item_id not in self._item_response:
            self._item_response[item_id] = rid
            if isinstance(rid, str):
                self._responses.setdefault(rid, _Response(rid)).items.append(item_id)
        return [Play(item_id, pcm)]

    def _prune(self, response: _Response) -> list[Action]:
        self._responses.pop(response.id, None)
        actions: list[Action] = []
        for item in response.items:
            self._item_response.pop(item, None)
            if item in self._cut_items:
                self._cut_items.discard(item)  # done: no more late audio can come for it
            else:
                actions.append(Forget(item))
        return actions

    def _note_session(self, session: dict[str, Any]) -> None:
        audio = session.get("audio")
        audio_in = audio.get("input") if isinstance(audio, dict) else None
        if isinstance(audio_in, dict):
            turn = audio_in.get("turn_detection", session.get("turn_detection"))
        else:
            turn = session.get("turn_detection")
            if audio is not None and not isinstance(audio_in, dict):
                return  # a shape we cannot read: keep what we knew
        if isinstance(turn, dict):
            self.interrupt_response = turn.get("interrupt_response", True) is not False
        elif turn is None and "audio" in session:
            self.interrupt_response = False  # client-committed turns: the page decides

    def _add(self, item: HistoryItem) -> HistoryItem:
        existing = self._history_index.get(item.id)
        if existing is not None:
            return existing
        if len(self.history) == self.history.maxlen:
            self._history_index.pop(self.history[0].id, None)
        self.history.append(item)
        self._history_index[item.id] = item
        return item

    def _remember(self, event: Event) -> None:
        """Keep the conversation as text, from the events that carry it."""
        kind = event.get("type")
        if kind == "conversation.item.input_audio_transcription.completed":
            item_id, text = event.get("item_id"), event.get("transcript")
            if isinstance(item_id, str) and isinstance(text, str):
                self._add(HistoryItem(item_id, "user")).text = text
        elif kind == "response.output_audio_transcript.done" or kind == "response.output_text.done":
            item_id = event.get("item_id")
            text = event.get("transcript") if kind.startswith("response.output_audio") else event.get("text")
            if isinstance(item_id, str) and isinstance(text, str):
                self._add(HistoryItem(item_id, "assistant")).text = text
        elif kind == "response.function_call_arguments.done":
            item_id = event.get("item_id")
            if isinstance(item_id, str):
                item = self._add(HistoryItem(item_id, "function_call"))
                item.text = str(event.get("arguments") or "")
                item.call_id = str(event.get("call_id") or "")
                item.name = str(event.get("name") or item.name)
        elif kind in ("conversation.item.added", "conversation.item.done", "response.output_item.done"):
            item = event.get("item")
            if isinstance(item, dict) and item.get("type") == "function_call" and isinstance(item.get("id"), str):
                h = self._add(HistoryItem(item["id"], "function_call"))
                h.name = str(item.get("name") or h.name)
                h.call_id = str(item.get("call_id") or h.call_id)
                h.text = str(item.get("arguments") or h.text)
            elif isinstance(item, dict) and item.get("type") == "message" and item.get("role") == "user":
                self._remember_created(item)

    def _remember_created(self, item: Any) -> None:
        """A page-created item (typed user text, a function call's output)."""
        if not isinstance(item, dict):
            return
        item_id = item.get("id") if isinstance(item.get("id"), str) else events.new_id("item")
        if item.get("type") == "function_call_output":
            h = self._add(HistoryItem(item_id, "function_call_output"))
            h.call_id, h.text = str(item.get("call_id") or ""), str(item.get("output") or "")
        elif item.get("type") == "message" and item.get("role") == "user":
            texts = [c.get("text") for c in item.get("content") or [] if isinstance(c, dict)
                     and c.get("type") == "input_text" and isinstance(c.get("text"), str)]
            if texts:
                self._add(HistoryItem(item_id, "user")).text = " ".join(texts)
