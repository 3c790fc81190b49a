"""What a question is, decided in one place before any work is done.

A question is a ``str`` that, once normalised, is non-empty Unicode text of at most
``query.max_question_chars`` characters. Everything else is refused with an
``InputError`` subclass that names the problem:

- **Not a str** (None, a number, bytes): ``QuestionTypeError`` names the type; bytes get a
  hint to decode them first. Never "empty": the caller passed the wrong thing.
- **Lone surrogates** (U+D800..U+DFFF): ``InvalidTextError``. They are not Unicode text:
  Python makes them from undecodable bytes (``surrogateescape`` on argv and file names, so
  a byte ``\\xff`` in a shell argument arrives as U+DCFF) or from ``"\\ud800"`` escapes.
  UTF-8 encoders, the cache key and the embedding tokenizer all raise on them.
- **Control characters**: the whitespace ones (tab, line feed, CR, VT, FF, U+001C..U+001F,
  U+0085, like every ``str.isspace`` character) are whitespace and collapse with the rest.
  Every other control character (category Cc: NUL, ESC, DEL, the C1 controls) is refused
  with ``InvalidTextError``, not removed: none belongs in a question, NUL ends strings in
  C code that may see the text later, and an ESC sequence would rewrite the terminal or
  log that prints the question back. Refusing says what was wrong instead of silently
  answering a different question.
- **Format characters** (zero-width joiner, the BOM, bidirectional marks: category Cf) are
  kept: real text needs them (emoji sequences, Persian, Hebrew). NFKC leaves them as they
  are, so they stay part of the cache key.
- **Normalisation**: ``cache.normalize_question`` (NFKC, whitespace runs collapsed to one
  space, trimmed). The result is what is embedded, keyed and answered, and normalising it
  again changes nothing.
- **Length** is counted after normalisation (``QuestionTooLongError``). An input more than
  ``_RAW_FACTOR`` times the limit is refused before it is normalised, so a huge string
  costs no work.

**Usage:** ``q = check_question(user_text, config.query.max_question_chars)``
"""

from __future__ import annotations

import re
import unicodedata

from ragserve.cache.keys import normalize_question, surrogate_error
from ragserve.errors import (
    EmptyQuestionError,
    InvalidParameterError,
    InvalidTextError,
    QuestionTooLongError,
    QuestionTypeError,
)

_RAW_FACTOR = 4
_RAW_SLACK = 4096
_CONTROL_NAMES = {0x00: "NUL", 0x1B: "ESC", 0x7F: "DEL"}
# NOTE: control characters exist only in U+0000..U+001F and U+007F..U+009F; the class is
# built from the Unicode data rather than typed, so it agrees with ``str.isspace``.
_REFUSED = re.compile(
    "[\ud800-\udfff"
    + "".join(re.escape(chr(c)) for c in (*range(0x20), *range(0x7F, 0xA0))
              if unicodedata.category(chr(c)) == "Cc" and not chr(c).isspace())
    + "]"
)


def check_question(question: object, max_chars: int) -> str:
    """The normalised question, or an ``InputError`` saying why it is not one."""
    if not isinstance(question, str):
        raise QuestionTypeError(question)
    if len(question) > max(_RAW_FACTOR * max_chars, max_chars + _RAW_SLACK):
        raise QuestionTooLongError(len(question), max_chars, "characters before normalisation")
    check_text(question, "question")
    normalised = normalize_question(question)
    if not normalised:
        raise EmptyQuestionError()
    if len(normalised) > max_chars:
        raise QuestionTooLongError(len(normalised), max_chars)
    return normalised


PRIORITY_LIMIT = 1_000_000
"""A priority is an int in -PRIORITY_LIMIT..PRIORITY_LIMIT (lower runs sooner)."""


def check_options(*, namespace: object = None, top_k: object = None, timeout_s: object = None,
                  priority: object = None) -> None:
    """A request's options other than the question (None: the config's)."""
    if namespace is not None:
        check_namespace(namespace)
    if priority is not None:
        check_priority(priority)
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 100):
        raise InvalidParameterError("top_k", top_k, "an int in 1..100")
    if timeout_s is not None and (not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool)
                                  or not 0 <= timeout_s < float("inf")):
        raise InvalidParameterError("timeout_s", timeout_s, "a number of seconds >= 0 (0: no deadline)")


def check_priority(priority: object) -> int:
    """A request's priority class: an int (not a bool, not a string) within
    ±``PRIORITY_LIMIT``; lower runs sooner."""
    if (not isinstance(priority, int) or isinstance(priority, bool)
            or not -PRIORITY_LIMIT <= priority <= PRIORITY_LIMIT):
        expected = f"an int in {-PRIORITY_LIMIT}..{PRIORITY_LIMIT} (lower runs sooner; default 0)"
        raise InvalidParameterError("priority", priority, expected)
    return priority


def check_namespace(namespace: object) -> None:
    """A cache namespace: a str of 1..256 characters, no lone surrogate, no control character."""
    if not isinstance(namespace, str):
        raise InvalidParameterError("namespace", namespace, "a str")
    if not 1 <= len(namespace) <= 256:
        raise InvalidParameterError("namespace", namespace, "1 to 256 characters")
    check_text(namespace, "namespace")


def check_text(text: str, what: str) -> None:
    """Refuse lone surrogates and non-whitespace control characters in ``text``; the error
    names ``what`` the text is, the code point and its position."""
    bad = _REFUSED.search(text)
    if bad is None:
        return
    code, at = ord(bad.group()), bad.start()
    if 0xD800 <= code <= 0xDFFF:
        raise surrogate_error(what, code, at)
    name = _CONTROL_NAMES.get(code)
    raise InvalidTextError(what, f"holds the control character U+{code:04X}{f' ({name})' if name else ''} at "
                                 f"position {at}; control characters other than whitespace are refused", at)
