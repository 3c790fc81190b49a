"""Cache keys: the normalised question and the SHA-256 over what decides an answer.

Keys are SHA-256 over a canonical encoding of the normalised question (NFKC, whitespace
collapsed and trimmed), the index fingerprint, the answer-changing config fingerprint
(generation model, sampling, prompt template version, top_k, the index's query-time search
settings) and the namespace. Python's ``hash()`` is never used: keys must agree across
processes and restarts.

The question-text rules both the key and ``engine/validation.py`` need (normalisation,
refusing text that is not Unicode) live here, below both.
"""

from __future__ import annotations

import hashlib
import unicodedata

import msgspec

from ragserve.errors import InvalidParameterError, InvalidTextError

KEY_VERSION = "k1"


def normalize_question(question: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", question).split())


def cache_key(question: str, *, index_fingerprint: str, answer_fingerprint: str, namespace: str) -> str:
    """SHA-256 hex of everything that decides the answer. ``question`` must be normalised.

    Text that is not Unicode (a lone surrogate) cannot be encoded into a key: that is an
    ``InvalidTextError`` naming the question or the namespace, never a ``UnicodeEncodeError``.
    """
    if not isinstance(namespace, str):
        raise InvalidParameterError("namespace", namespace, "a str")
    try:
        canonical = msgspec.json.encode([KEY_VERSION, question, index_fingerprint, answer_fingerprint, namespace])
    except UnicodeEncodeError:
        check_unicode(question, "question")
        check_unicode(namespace, "namespace")
        raise
    return hashlib.sha256(canonical).hexdigest()


def partition_key(*, index_fingerprint: str, answer_fingerprint: str, namespace: str) -> str:
    """The semantic tier's partition: SHA-256 of what ``cache_key`` hashes, but the
    question. Entries of two partitions are never compared (a hard partition, never a
    distance)."""
    if not isinstance(namespace, str):
        raise InvalidParameterError("namespace", namespace, "a str")
    check_unicode(namespace, "namespace")
    canonical = msgspec.json.encode([KEY_VERSION, "semantic", index_fingerprint, answer_fingerprint, namespace])
    return hashlib.sha256(canonical).hexdigest()


def check_unicode(text: str, what: str) -> None:
    """Refuse text that is not Unicode (a lone surrogate): what no UTF-8 encoder takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise surrogate_error(what, ord(text[e.start]), e.start) from None


def surrogate_error(what: str, code: int, at: int) -> InvalidTextError:
    problem = f"is not valid Unicode text: a lone surrogate U+{code:04X} at position {at}"
    if 0xDC80 <= code <= 0xDCFF:  # how surrogateescape carries an undecodable byte
        problem += f" (the byte 0x{code - 0xDC00:02X}, undecodable: is the input UTF-8?)"
    return InvalidTextError(what, problem, at)
