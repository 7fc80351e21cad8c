"""Semantic end of turn: the rule set measured on labelled utterances, written as Whisper
writes them (its punctuation is part of what it heard), and the short-window decode's
repeat cutting."""

from __future__ import annotations

from localrt.endofturn import EAGERNESS, Verdict, judge
from localrt.stt import without_repeats

#: Finished utterances: answered after the short silence.
COMPLETE = [
    "What is the weather like today?", "Please tell me a story about a dragon.", "How far away is the moon?",
    "Good morning, how are you?", "Yes.", "No, thank you.", "Thanks!", "Can you help me cook dinner tonight?",
    "I left my keys somewhere in the garden.", "Which bus goes to the central station?",
    "Send a message to my brother saying I will be late.", "Turn the volume down a little, please.",
    "My doctor told me to walk more every day.", "What time is it?", "Stop.", "That's all for now.",
    "Set a timer for ten minutes.", "Where is the nearest pharmacy?", "I think so.", "Tell me a joke.",
    "Is it going to snow in the mountains this week?", "How do I get to the airport from here?",
    "Call mom.", "What's two plus two?", "Play something by the Beatles.", "Okay, sounds good.",
]
#: Unfinished: the speaker paused mid-thought, the answer must wait.
INCOMPLETE = [
    "Can you tell me the", "I would like to book a table for", "How many eggs do I need to",
    "My phone keeps losing the", "I was thinking about", "Could you add eggs and", "What is the weather like in",
    "Please remind me to", "I want to go to the beach because", "Well, um", "So I was wondering if",
    "The meeting is with my", "I need a flight from", "Let me think...", "Add milk, bread,",
    "Play some music by", "If it rains tomorrow,", "Can you tell me how far it is to the", "I'd like a coffee with",
    "Yesterday I went to the shop and", "Is there a train that", "We should plant tomatoes in the",
]


def test_no_finished_utterance_is_held_and_no_unfinished_one_is_answered_early():
    held = [t for t in COMPLETE if judge(t) is Verdict.INCOMPLETE]
    early = [t for t in INCOMPLETE if judge(t) is Verdict.COMPLETE]
    assert held == [] and early == []
    # most of each are judged for sure (an unsure verdict costs a medium wait, not the limit)
    assert sum(judge(t) is Verdict.COMPLETE for t in COMPLETE) >= 0.9 * len(COMPLETE)
    assert sum(judge(t) is Verdict.INCOMPLETE for t in INCOMPLETE) >= 0.9 * len(INCOMPLETE)


def test_weak_endings_and_empty_transcripts_are_unsure_and_eagerness_orders_the_waits():
    assert judge("Turn the lights on.") is Verdict.UNSURE
    assert judge("") is Verdict.UNSURE and judge("  ") is Verdict.UNSURE
    assert judge("what is the weather like today") is Verdict.UNSURE  # no punctuation: Whisper was unsure
    for timing in EAGERNESS.values():
        assert timing.complete_ms < timing.unsure_ms < timing.limit_ms
    assert EAGERNESS["high"].complete_ms < EAGERNESS["auto"].complete_ms < EAGERNESS["low"].complete_ms
    assert EAGERNESS["auto"] == EAGERNESS["medium"]


def test_a_short_window_decode_that_repeats_itself_keeps_the_first_copy():
    assert without_repeats("Where did I put the blue umbrella? Where did I put the blue umbrella?") == \
        "Where did I put the blue umbrella?"
    assert without_repeats("Where did I put the blue umbrella? Where did I") == "Where did I put the blue umbrella?"
    assert without_repeats("I went out. Then I came back.") == "I went out. Then I came back."
    assert without_repeats("No. No, I mean yes.") == "No. No, I mean yes."
