"""What the generator adds, and what it makes up: an extractive baseline and groundedness.

Contains-gold at ~20 words rewards length, and some of its hits are lucky: an answer that
names a date its sources never give may still contain the gold. Two figures beside it:

- ``extractive_window(question, text, n_words)``: the ``n_words`` consecutive words of
  ``text`` (the top source) that hold the most distinct question words (SQuAD-normalised,
  function words left out); the earliest window wins a tie. Scored like an answer of the
  same length, it is a baseline with no model at all: the generator's answer has to beat
  it to have added something.
- ``groundedness(answer, sources)``: the share of the answer's content words (numbers,
  names, every other word that is not a function word) that occur in its sources, and the
  numbers and names that do not. An answer with one of those is *ungrounded*: the number
  or name came from the model, not from what was retrieved.

Words are compared after SQuAD's normalisation (``eval/scoring.normalize_answer``): lower
case, no punctuation, so "1,755" and "1755" are the same word. No tagger is used: a name is
a capitalised word that does not start a sentence, a number is a word with a digit in it.
So a name that opens the answer is checked as a content word but never reported as an
ungrounded name (a sentence's first word cannot be told from a name without a tagger).

**Usage:** ``window = extractive_window(q, result.sources[0].text, len(result.answer.split()))``
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ragserve.eval.scoring import normalize_answer

# English function words: never content, never counted as question words.
FUNCTION_WORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before
being below between both but by can could did do does doing down during each either few for
from further had has have having he her here hers herself him himself his how i if in into is
it its itself just me might more most must my myself neither no nor not now of off on once
only or other ought our ours ourselves out over own same shall she should so some such than
that the their theirs them themselves then there these they this those through to too under
until up upon us very was we were what when where which while who whom whose why will with
within without would yes yet you your yours yourself yourselves
""".split())

_WORD = re.compile(r"\w+(?:[.,'’]\w+)*")
_SENTENCE_ENDS = frozenset('.!?:;"“”()[]')


def _words(text: str) -> list[str]:
    return [w for w in (normalize_answer(m) for m in _WORD.findall(text)) if w]


def extractive_window(question: str, text: str, n_words: int) -> str:
    """The ``n_words``-word window of ``text`` with the most distinct question words (the
    earliest on a tie; the whole text when it is shorter; "" for ``n_words`` < 1)."""
    words = text.split()
    if n_words < 1 or not words:
        return ""
    if len(words) <= n_words:
        return " ".join(words)
    wanted = {w for w in _words(question) if w not in FUNCTION_WORDS}
    norm = [normalize_answer(w) for w in words]
    best, best_at = -1, 0
    for start in range(len(words) - n_words + 1):
        hits = len(wanted.intersection(norm[start:start + n_words]))
        if hits > best:
            best, best_at = hits, start
    return " ".join(words[best_at:best_at + n_words])


@dataclass(frozen=True)
class Grounding:
    content_words: int
    """Content words in the answer (each occurrence)."""
    grounded_share: float
    """Share of them found in the sources (1.0 for an answer with none)."""
    ungrounded: tuple[str, ...]
    """Numbers and names of the answer that no source has, normalised, first occurrence order."""


def groundedness(answer: str, sources: Iterable[str]) -> Grounding:
    """How much of ``answer`` its ``sources`` (their texts) support."""
    seen = set()
    for text in sources:
        seen.update(_words(text))
    content, found, missing = 0, 0, []
    for raw, word, is_name in _content_words(answer):
        content += 1
        if word in seen:
            found += 1
        elif (is_name or any(c.isdigit() for c in raw)) and word not in missing:
            missing.append(word)
    return Grounding(content, found / content if content else 1.0, tuple(missing))


def _content_words(text: str) -> Iterable[tuple[str, str, bool]]:
    """(raw word, normalised word, is a name) for each content word of ``text``."""
    end = None  # where the previous word ended; None before the first
    for m in _WORD.finditer(text):
        raw, gap = m.group(), text[end or 0:m.start()].rstrip()
        starts_sentence = end is None or (bool(gap) and gap[-1] in _SENTENCE_ENDS)
        end = m.end()
        word = normalize_answer(raw)
        if not word or (word in FUNCTION_WORDS and not any(c.isdigit() for c in raw)):
            continue
        yield raw, word, raw[0].isupper() and not starts_sentence
