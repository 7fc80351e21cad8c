"""Semantic end of turn: does what was said so far sound like a finished sentence?

OpenAI's `semantic_vad` waits less when the sentence is clearly over and longer
when the speaker seems to be mid-thought ("can you tell me …", "… and"). The
local backend does the same from the running transcript (Whisper's speculative
decode of the turn so far, which Whisper punctuates): no end-of-turn model small
enough to ship inside a wheel was found on PyPI (the ones published are fetched
from a model hub at run time), so this is a rule set, measured on the labelled
utterances in `tests/test_endofturn.py`.

`judge(text)` gives one of three verdicts; `SemanticTiming` turns a verdict into
the silence that ends the turn at an eagerness. A turn is never held past the
eagerness's limit, whatever the verdict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class Verdict(str, Enum):
    COMPLETE = "complete"
    UNSURE = "unsure"
    INCOMPLETE = "incomplete"


#: Words a sentence does not end on: articles, conjunctions, most prepositions, possessives
#: and hesitations.
_OPEN_ENDINGS = frozenset("""
a an the and or but nor because since although though unless until while whereas if than which who whom
whose where when whether to of for with without from into onto about by at as like via per between among through
during before after my your his her its our their every no um uh er erm hmm plus including such""".split())
#: Words that end a sentence only when the speaker closes it ("I think so.", "Yes, it is.",
#: "What is this?"): with closing punctuation unsure, without it unfinished.
_SOFT_ENDINGS = frozenset("""
so that this these those some any each is are was were be been am do does did have has had will would can could
should shall may might must just very really also then""".split())
#: Endings that finish a sentence often enough ("turn it on.", "what is it about?") to be unsure.
_WEAK_ENDINGS = frozenset("on in up off out over down around back here there".split())
_TRAILING = re.compile(r"(\.\.\.|…|,|;|:|-|–|—)\s*$")
_FINAL = re.compile(r"[.?!]\s*$")
_WORD = re.compile(r"[a-z']+")


def judge(text: str) -> Verdict:
    """How finished the transcript so far sounds."""
    text = text.strip()
    words = _WORD.findall(text.lower())
    if not words:
        return Verdict.UNSURE  # heard nothing we can read: the silence decides
    if _TRAILING.search(text):
        return Verdict.INCOMPLETE  # Whisper marks a trailing-off voice with "..." or a comma
    last = words[-1]
    if last in _OPEN_ENDINGS:
        return Verdict.INCOMPLETE
    if last in _SOFT_ENDINGS:
        return Verdict.UNSURE if _FINAL.search(text) else Verdict.INCOMPLETE
    if last in _WEAK_ENDINGS:
        return Verdict.UNSURE
    if text.endswith("?") or text.endswith("!"):
        return Verdict.COMPLETE
    if _FINAL.search(text):
        return Verdict.COMPLETE
    return Verdict.UNSURE  # no closing punctuation: Whisper was not sure either


@dataclass(frozen=True)
class SemanticTiming:
    """Silence (ms) that ends a turn judged complete, unsure, incomplete; the last is the limit."""

    complete_ms: int
    unsure_ms: int
    limit_ms: int

    def silence_for(self, verdict: Verdict) -> int:
        return {Verdict.COMPLETE: self.complete_ms, Verdict.UNSURE: self.unsure_ms}.get(verdict, self.limit_ms)


#: By eagerness, as OpenAI names them ('auto' is 'medium'). OpenAI's limits are 8/4/2 s; ours are
#: shorter because a rule set is wrong more often than a model, and a wrong "incomplete" costs
#: the whole limit.
EAGERNESS = {
    "high": SemanticTiming(complete_ms=150, unsure_ms=300, limit_ms=1000),
    "medium": SemanticTiming(complete_ms=200, unsure_ms=500, limit_ms=2000),
    "auto": SemanticTiming(complete_ms=200, unsure_ms=500, limit_ms=2000),
    "low": SemanticTiming(complete_ms=400, unsure_ms=900, limit_ms=3000),
}
