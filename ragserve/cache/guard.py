"""The semantic tier's guard: what must agree between a question and a cached one besides
their embeddings' similarity.

Sentence embeddings score "What did Tesla not invent?" / "What did Tesla invent?", or
"population in 1990" / "population in 2000", above any threshold in use; a changed number,
name or negation changes the right answer while moving the vector very little. The guard
refuses such a pair whatever its similarity, by cheap text rules (a few µs per pair):

- **negation**: the sides have a different number of negation words ("not", "never", "no",
  "n't", "without", ...): "not" against "not not" counts too;
- **question type**: the question words differ in kind (who / when / where / why / how
  many / how / what-which; "what year" counts as when): "Who founded X?" and "When was X
  founded?" share every content word;
- **numbers**: the sets of numbers (digits, number words, ordinals) differ;
- **entities**: the sets of capitalised words past the first word (names, places, titles)
  differ, compared case-insensitively;
- **content** (``strict`` only): the sets of content words (function words and question
  words dropped, light suffix stemming) differ.

``guard_reason(q, cached, mode)`` returns why a pair is refused, or None when it passes.
Measured on XQuAD pairs in ``docs/semantic.md``.
"""

from __future__ import annotations

import re
from functools import lru_cache

NEGATIONS = frozenset("""not no never none nobody nothing neither nor nowhere without cannot
n't isn't wasn't aren't weren't don't doesn't didn't won't wouldn't can't couldn't shouldn't
hasn't haven't hadn't mustn't""".split())

NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
NUMBER_WORDS.update({w: str(i + 1) for i, w in enumerate(
    "first second third fourth fifth sixth seventh eighth ninth tenth".split())})
NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70",
                     "eighty": "80", "ninety": "90", "hundred": "100", "thousand": "1000",
                     "million": "1000000", "billion": "1000000000", "dozen": "12", "half": "0.5"})

# Function words, question words and the words of polite frames: what a paraphrase may add,
# drop or swap without changing the answer.
STOPWORDS = frozenset("""a an the of in on at to for from by with about into onto over under
after before during since until as than then that this these those there here which what who
whom whose when where why how is are was were be been being am do does did done has have had
having will would shall should can could may might must it its it's they them their he him his
she her we us our you your i me my and or but if so also too very just any some each every
other another such much many more most less least own same s tell please know like want wish
curious wondering let kindly question answer explain name give say said do does find out
really actually exactly one whether quick something anything called i'd i'm what's who's where's
when's how's that's there's""".split())

_TOKEN = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?|\d+(?:[.,]\d+)*")


_WH = (("how many", "how-many"), ("how much", "how-many"), ("what number", "how-many"),
       ("what year", "when"), ("which year", "when"), ("what date", "when"), ("what time", "when"),
       ("who", "who"), ("whom", "who"), ("whose", "who"), ("when", "when"), ("where", "where"),
       ("why", "why"), ("how", "how"), ("what", "what"), ("which", "what"))
_WH_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w, _ in _WH) + r")\b")
_WH_KIND = dict(_WH)


@lru_cache(maxsize=65_536)
def features(text: str) -> tuple[int, frozenset[str], frozenset[str], frozenset[str], frozenset[str]]:
    """(negations, numbers, entities, content words, question types) of one question;
    cached per text."""
    raw = _TOKEN.findall(text)
    negs, nums, ents, content = 0, set(), set(), set()
    kinds = frozenset(_WH_KIND[m.group(1)] for m in _WH_RE.finditer(text.lower()))
    for i, tok in enumerate(raw):
        low = tok.lower()
        if low in NEGATIONS or low.endswith("n't"):
            negs += 1
            continue
        if tok[0].isdigit():
            nums.add(tok.replace(",", ""))
            continue
        if low in NUMBER_WORDS:
            nums.add(NUMBER_WORDS[low])
            continue
        # A capitalised word past the first is a name, unless it is a function word (a
        # question after a frame: "Quick question: When ...").
        if low not in STOPWORDS and (i > 0 and tok[0].isupper() or len(tok) > 1 and tok.isupper()):
            ents.add(low)
        if low not in STOPWORDS and len(low) > 1:
            content.add(stem(low))
    return negs, frozenset(nums), frozenset(ents), frozenset(content), kinds


def stem(word: str) -> str:
    """A light suffix stripper: "founded"/"founder"/"founding" → "found", "cities" → "city"."""
    if word.endswith("'s"):
        word = word[:-2]
    for suffix, repl in (("ies", "y"), ("ing", ""), ("ers", ""), ("er", ""), ("ed", ""), ("es", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: len(word) - len(suffix)] + repl
    return word


def _cased(text: str) -> bool:
    return any(ch.isupper() for ch in text)


def guard_reason(question: str, cached: str, mode: str) -> str | None:
    """Why ``cached``'s answer must not be served for ``question`` ("negation", "question",
    "number", "entity", "content"), or None. ``mode``: "off", "entities" or "strict"."""
    if mode == "off":
        return None
    a, b = features(question), features(cached)
    if a[0] != b[0]:
        return "negation"
    if a[4] != b[4]:
        return "question"
    if a[1] != b[1]:
        return "number"
    # A question typed all in lower case has no capitals to find names by: its names are
    # compared as content words ("strict") only.
    if a[2] != b[2] and _cased(question) and _cased(cached):
        return "entity"
    if mode == "strict" and a[3] != b[3]:
        return "content"
    return None
