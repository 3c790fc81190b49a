"""Corpus reading and chunking: every file gets an outcome, nothing is dropped silently.

- Text files (.txt .md .rst .text) and HTML (.html .htm) are decoded here: UTF-8 first,
  then charset detection (charset-normalizer). llama-index's own text and HTML readers
  open files as UTF-8 only, which would drop or garble legacy-encoded files.
  HTML is reduced to its visible text with BeautifulSoup (what llama-index's HTML
  reader uses).
- PDF goes through llama-index's ``PDFReader`` (pypdf), one document per page.
- Chunks come from llama-index's ``SentenceSplitter``, sized in the embedding model's
  own tokens so that no chunk is longer than the model reads.

A file is skipped, with its reason in the build summary, when it is unreadable, empty,
undecodable, fails to parse, is of a type no reader handles, or is larger than
``chunk.max_file_mb``. One file never loses the build:

- Text with a UTF-16 or UTF-32 byte-order mark is decoded by it (its NUL bytes are not
  "binary content").
- A long document is chunked in sections of at most ``SECTION_CHARS`` characters, cut at
  paragraph, line or word boundaries: the splitter (and the tokenizer it counts with)
  never sees more than one section at once, so time and memory per call stay bounded.
  Before this a 50 MB file took 7 GiB and died in the sentence splitter's regex guard.
- A section the sentence splitter fails on is chunked by a plain word-window splitter
  (``metadata["splitter"] == "fallback"``); a document that cannot be chunked even so is
  reported through ``on_skip`` and left out, and the rest of the build goes on.
"""

from __future__ import annotations

import codecs
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ragserve.errors import IngestError
from ragserve.types import Chunk

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm"}
PDF_SUFFIXES = {".pdf"}
SUPPORTED = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES
# NOTE: short legacy texts are ambiguous between the Western code pages; cp1252 is by far
# the most common, so it wins when it decodes with nearly as little "chaos" as the best.
_PREFERRED_LEGACY = "cp1252"
_CHAOS_MARGIN = 0.1
# UTF-32 first: its little-endian mark starts with UTF-16's. The codecs drop the mark.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
SECTION_CHARS = 32_000
"""Most characters the sentence splitter gets in one call (about 30 chunks of 256 tokens)."""


class Skip(Exception):
    """A file is not ingested; the message is the reason shown in the summary."""


@dataclass(frozen=True)
class FileOutcome:
    path: str
    status: Literal["ok", "skipped"]
    reason: str = ""
    encoding: str | None = None
    documents: int = 0
    chunks: int = 0


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def iter_files(source: Path) -> tuple[Path, list[Path]]:
    """The root that doc ids are relative to, and the files under ``source`` in order."""
    source = Path(source)
    if source.is_file():
        return source.parent, [source]
    if source.is_dir():
        return source, sorted(p for p in source.rglob("*") if p.is_file() or p.is_symlink())
    raise IngestError(f"{source}: no such file or folder")


def decode_text(data: bytes, forced: str | None = None) -> tuple[str, str]:
    """Decode bytes to text; returns (text, encoding). Raises Skip when it cannot."""
    for bom, codec in () if forced else _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(codec), codec
            except UnicodeDecodeError as e:
                raise Skip(f"undecodable text: a {codec} byte-order mark, but not valid {codec} "
                           f"({e.reason} at byte {e.start})") from None
    if b"\x00" in data[:8192]:
        raise Skip("undecodable text: binary content (NUL bytes)")
    if forced:
        try:
            return data.decode(forced), forced
        except UnicodeDecodeError as e:
            raise Skip(f"undecodable text: not valid {forced} ({e.reason} at byte {e.start})") from None
    try:
        return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    matches = list(from_bytes(data))
    if not matches:
        raise Skip("undecodable text: not UTF-8 and no known encoding fits")
    best = min(matches, key=lambda m: m.chaos)
    for m in matches:
        if m.encoding == _PREFERRED_LEGACY and m.chaos <= best.chaos + _CHAOS_MARGIN:
            best = m
    return str(best), best.encoding


def _html_text(markup: str) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(markup, "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    title = soup.title.get_text(strip=True) if soup.title else ""
    body = soup.body or soup
    text = "\n".join(line.strip() for line in body.get_text("\n").splitlines() if line.strip())
    return f"{title}\n\n{text}" if title and not text.startswith(title) else text


def _pdf_documents(path: Path, doc_id: str) -> list[Document]:
    from llama_index.readers.file import PDFReader

    try:
        pages = PDFReader().load_data(file=path)
    except Exception as e:  # noqa: BLE001 - pypdf raises many types for a bad file
        # PDFReader retries with tenacity, which wraps pypdf's error in a RetryError whose
        # text is "RetryError[<Future ...>]": report the error of the last attempt.
        attempt = getattr(e, "last_attempt", None)
        cause = attempt.exception() if attempt is not None and attempt.failed else None
        e = cause or e
        raise Skip(f"parse error: {type(e).__name__}: {e}") from None
    docs = []
    for page in pages:
        if page.text.strip():
            label = page.metadata.get("page_label", str(len(docs) + 1))
            docs.append(Document(doc_id, page.text, {"page_label": label}))
    if not docs:
        raise Skip("empty: no extractable text (a scanned PDF needs OCR first)")
    return docs


def read_file(path: Path, doc_id: str, encoding: str | None = None,
              max_bytes: int = 0) -> tuple[list[Document], str | None]:
    """Documents of one file and the text encoding used. Raises Skip with the reason.
    ``max_bytes`` > 0 skips larger files (``chunk.max_file_mb``)."""
    suffix = path.suffix.lower()
    if any(part.startswith(".") for part in Path(doc_id).parts):
        raise Skip("hidden file or folder")
    if suffix not in SUPPORTED:
        raise Skip(f"unsupported file type {suffix or '(no extension)'!r}; supported: {', '.join(sorted(SUPPORTED))}")
    try:
        size = path.stat().st_size
        if size == 0:
            raise Skip("empty: 0 bytes")
        if max_bytes and size > max_bytes:
            raise Skip(f"too large: {size / 2**20:.1f} MB, over the limit of {max_bytes / 2**20:g} MB "
                       "(chunk.max_file_mb; raise it, or split the file)")
        if suffix in PDF_SUFFIXES:
            return _pdf_documents(path, doc_id), None
        data = path.read_bytes()
    except OSError as e:
        raise Skip(f"unreadable: {e.strerror or e}") from None
    text, used = decode_text(data, encoding)
    if suffix in HTML_SUFFIXES:
        text = _html_text(text)
    if not text.strip():
        raise Skip("empty: no text after decoding")
    return [Document(doc_id, text, {"encoding": used})], used


def read_corpus(source: Path, encoding: str | None = None,
                max_bytes: int = 0) -> tuple[list[Document], list[FileOutcome]]:
    root, files = iter_files(source)
    docs: list[Document] = []
    outcomes: list[FileOutcome] = []
    for path in files:
        doc_id = path.relative_to(root).as_posix()
        try:
            file_docs, used = read_file(path, doc_id, encoding, max_bytes)
        except Skip as e:
            outcomes.append(FileOutcome(doc_id, "skipped", str(e)))
            continue
        docs.extend(file_docs)
        outcomes.append(FileOutcome(doc_id, "ok", encoding=used, documents=len(file_docs)))
    return docs, outcomes


def chunk_documents(
    docs: list[Document],
    chunk_size: int,
    chunk_overlap: int,
    tokenizer: Callable[[str], list[Any]] | None = None,
    on_skip: Callable[[str, str], None] | None = None,
) -> Iterator[Chunk]:
    """Split with llama-index's SentenceSplitter, one bounded section at a time; chunk ids
    are 0..n-1 in corpus order.

    A section the splitter fails on is split by ``fallback_split``. A document that still
    cannot be chunked is left out and reported as ``on_skip(doc_id, reason)``; without
    ``on_skip`` that is an ``IngestError``.
    """
    with warnings.catch_warnings():  # llama-index's pydantic models warn on import
        warnings.simplefilter("ignore")
        from llama_index.core.node_parser import SentenceSplitter

    splitter = SentenceSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap, tokenizer=tokenizer)
    next_id = 0
    for doc in docs:
        try:
            # NOTE: a document's chunks are held until it is done, so that one failing
            # half-way leaves no chunks behind (chunk ids stay consecutive).
            pieces = list(_split_document(doc.text, splitter, chunk_size, tokenizer))
        except Exception as e:  # noqa: BLE001 - tokenizers and splitters raise many types
            reason = f"cannot be chunked: {type(e).__name__}: {e}"
            if on_skip is None:
                raise IngestError(f"{doc.doc_id}: {reason}") from e
            on_skip(doc.doc_id, reason)
            continue
        for i, (text, splitter_name) in enumerate(pieces):
            meta = {**doc.metadata, "file_path": doc.doc_id, "chunk_index": i}
            if splitter_name != "sentence":
                meta["splitter"] = splitter_name
            yield Chunk(chunk_id=next_id, doc_id=doc.doc_id, text=text, metadata=meta)
            next_id += 1


def _split_document(text: str, splitter: Any, chunk_size: int,
                    tokenizer: Callable[[str], list[Any]] | None) -> Iterator[tuple[str, str]]:
    for section in sections(text):
        try:
            parts, name = splitter.split_text(section), "sentence"
        except Exception:  # noqa: BLE001 - e.g. the regex guard's TimeoutError on hostile text
            parts, name = fallback_split(section, chunk_size, tokenizer), "fallback"
        yield from ((p, name) for p in parts if p.strip())


def sections(text: str, max_chars: int = SECTION_CHARS) -> Iterator[str]:
    """``text`` in pieces of at most ``max_chars``, cut after a blank line, else a line end,
    else a space (looked for in the second half of the window), else anywhere."""
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = -1
        for sep in ("\n\n", "\n", " "):
            cut = text.rfind(sep, start + max_chars // 2, end)
            if cut >= 0:
                cut += len(sep)
                break
        cut = end if cut < 0 else cut
        yield text[start:cut]
        start = cut
    yield text[start:]


def fallback_split(text: str, chunk_size: int, tokenizer: Callable[[str], list[Any]] | None = None) -> list[str]:
    """Words packed greedily into chunks of at most ``chunk_size`` tokens, without overlap;
    a single word longer than that is cut every ``chunk_size // 4`` characters (a token is
    at least a quarter of a character in the byte-level tokenizers). Counts with
    ``tokenizer`` (words when None). Plain and linear: it must not fail where the sentence
    splitter did."""
    count = (lambda w: len(tokenizer(w))) if tokenizer else (lambda w: 1)
    piece = max(1, chunk_size // 4)
    chunks: list[str] = []
    words: list[str] = []
    tokens = 0
    for word in text.split():
        for part in ([word] if len(word) <= piece else [word[i:i + piece] for i in range(0, len(word), piece)]):
            n = count(part)
            if words and tokens + n > chunk_size:
                chunks.append(" ".join(words))
                words, tokens = [], 0
            words.append(part)
            tokens += n
    if words:
        chunks.append(" ".join(words))
    return chunks
