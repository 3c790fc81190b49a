"""Corpus reading and chunking: every file gets an outcome, nothing is dropped silently.

- Text files (.txt .md .rst .text) and HTML (.html .htm) are decoded by ``textfile.py``:
  UTF-8 first, then charset detection (charset-normalizer). llama-index's own text and
  HTML readers open files as UTF-8 only, which would drop or garble legacy-encoded files.
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
- A build reads plain text with ``chunk_file``, which streams it (``TextStream``:
  bounded reads, incremental decoding, the SHA-256 of the bytes read) into
  ``stream_sections``: memory while chunking holds one read and one section besides the
  file's chunks, never the file's bytes or its whole text.
- A section the sentence splitter fails on is chunked by a plain word-window splitter
  (``metadata["splitter"] == "fallback"``); a document that cannot be chunked even so is
  reported through ``on_skip`` and left out, and the rest of the build goes on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ragserve.build.textfile import READ_SIZE, Skip, TextStream, WholeFileNeeded, decode_text
from ragserve.errors import IngestError
from ragserve.types import Chunk

__all__ = ["SECTION_CHARS", "SUPPORTED", "Chunker", "Document", "FileChunks", "FileOutcome", "Skip", "chunk_documents",
           "chunk_file", "decode_text", "fallback_split", "iter_files", "read_corpus", "read_file", "sections",
           "stream_sections"]

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm"}
PDF_SUFFIXES = {".pdf"}
SUPPORTED = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES
SECTION_CHARS = 32_000
"""Most characters the sentence splitter gets in one call (about 30 chunks of 256 tokens)."""


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


@dataclass(frozen=True)
class FileChunks:
    """One file read and chunked (``chunk_file``); chunk ids are 0..n-1 within the file."""

    chunks: list[Chunk]
    documents: int
    encoding: str | None
    sha256: str | None = None
    """SHA-256 of the bytes that were chunked, when the file was streamed; None when it was
    read whole (HTML, PDF, text that needed charset detection)."""


def iter_files(source: Path) -> tuple[Path, list[Path]]:
    """The root that doc ids are relative to, and the files under ``source`` in order."""
    source = Path(source)
    if source.is_file():
        return source.parent, [source]
    if source.is_dir():
        return source, sorted(p for p in source.rglob("*") if p.is_file() or p.is_symlink())
    raise IngestError(f"{source}: no such file or folder")


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


def _admit(path: Path, doc_id: str, max_bytes: int) -> str:
    """The file's suffix if it is to be read; raises Skip with the reason if not."""
    suffix = path.suffix.lower()
    if any(part.startswith(".") for part in Path(doc_id).parts):
        raise Skip("hidden file or folder")
    if suffix not in SUPPORTED:
        raise Skip(f"unsupported file type {suffix or '(no extension)'!r}; supported: {', '.join(sorted(SUPPORTED))}")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise Skip(f"unreadable: {e.strerror or e}") from None
    if size == 0:
        raise Skip("empty: 0 bytes")
    if max_bytes and size > max_bytes:
        raise Skip(f"too large: {size / 2**20:.1f} MB, over the limit of {max_bytes / 2**20:g} MB "
                   "(chunk.max_file_mb; raise it, or split the file)")
    return suffix


def read_file(path: Path, doc_id: str, encoding: str | None = None,
              max_bytes: int = 0) -> tuple[list[Document], str | None]:
    """Documents of one file, its text held whole, and the text encoding used. Raises Skip
    with the reason. ``max_bytes`` > 0 skips larger files (``chunk.max_file_mb``)."""
    suffix = _admit(path, doc_id, max_bytes)
    try:
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


def chunk_file(path: Path, doc_id: str, chunker: Chunker, encoding: str | None = None, max_bytes: int = 0,
               read_size: int = READ_SIZE) -> FileChunks:
    """Read and chunk one file; raises Skip with the reason (unreadable, empty, cannot be
    chunked...). A plain-text file is streamed: read ``read_size`` bytes at a time,
    decoded incrementally and cut into sections as it arrives, so that neither its bytes
    nor its whole text are ever held; only its chunks are. The chunks, their ids and the
    reasons are exactly those of ``read_file`` + ``chunk_documents`` (the tests compare).

    HTML (a parser needs the whole markup), PDF (pages) and text that is not UTF-8 and has
    no byte-order mark (charset detection needs every byte) are read whole, as
    ``read_file`` does.

    **Usage:** ``chunk_file(Path("big.txt"), "big.txt", Chunker(256, 32)).chunks``
    """
    if _admit(path, doc_id, max_bytes) in TEXT_SUFFIXES:
        try:
            return _chunk_stream(TextStream(path, encoding, read_size), doc_id, chunker)
        except WholeFileNeeded:
            pass  # NOTE: the sections chunked so far are dropped: the whole-file path decides
    docs, used = read_file(path, doc_id, encoding, max_bytes)
    failed: dict[str, str] = {}
    chunks = list(chunker.documents(docs, on_skip=failed.__setitem__))
    if not chunks and failed:
        raise Skip(failed[doc_id])
    return FileChunks(chunks, len(docs), used)


def _chunk_stream(stream: TextStream, doc_id: str, chunker: Chunker) -> FileChunks:
    parts: list[tuple[str, str]] = []
    failure: Exception | None = None
    for section in stream_sections(stream, chunker.section_chars):
        if failure is None:
            try:
                parts.extend(chunker.split(section))
            except Exception as e:  # noqa: BLE001 - tokenizers and splitters raise many types
                failure, parts = e, []
    # NOTE: the file is read to its end even after a section failed, so that a decode
    # error or a blank file gets the reason the whole-file path gives (it decodes first).
    if not stream.has_text:
        raise Skip("empty: no text after decoding")
    if failure is not None:
        raise Skip(_unchunkable(failure))
    return FileChunks(_chunks(doc_id, {"encoding": stream.encoding}, parts, 0), 1, stream.encoding, stream.sha256)


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
    yield from Chunker(chunk_size, chunk_overlap, tokenizer).documents(docs, on_skip)


class Chunker:
    """The sentence splitter and its fallback, made once and used for every document.

    ``split`` takes one section (at most ``section_chars`` characters): the splitter and
    the tokenizer it counts with never see more, so time and memory per call stay bounded
    however large the document. ``splitter`` replaces llama-index's ``SentenceSplitter``
    (anything with ``split_text``).

    **Usage:** ``Chunker(256, 32, tokenizer).documents(docs)``
    """

    def __init__(self, chunk_size: int, chunk_overlap: int, tokenizer: Callable[[str], list[Any]] | None = None,
                 *, section_chars: int = SECTION_CHARS, splitter: Any = None) -> None:
        if splitter is None:
            with warnings.catch_warnings():  # llama-index's pydantic models warn on import
                warnings.simplefilter("ignore")
                from llama_index.core.node_parser import SentenceSplitter
            splitter = SentenceSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap, tokenizer=tokenizer)
        self.chunk_size, self.tokenizer, self.section_chars, self.splitter = (chunk_size, tokenizer, section_chars,
                                                                              splitter)

    def split(self, section: str) -> list[tuple[str, str]]:
        """Chunk texts of one section, each with the name of the splitter that made it."""
        try:
            parts, name = self.splitter.split_text(section), "sentence"
        except Exception:  # noqa: BLE001 - e.g. the regex guard's TimeoutError on hostile text
            parts, name = fallback_split(section, self.chunk_size, self.tokenizer), "fallback"
        return [(p, name) for p in parts if p.strip()]

    def documents(self, docs: Iterable[Document], on_skip: Callable[[str, str], None] | None = None) -> Iterator[Chunk]:
        """``chunk_documents`` with this chunker."""
        next_id = 0
        for doc in docs:
            try:
                # NOTE: a document's chunks are held until it is done, so that one failing
                # half-way leaves no chunks behind (chunk ids stay consecutive).
                parts = [p for section in sections(doc.text, self.section_chars) for p in self.split(section)]
            except Exception as e:  # noqa: BLE001 - tokenizers and splitters raise many types
                if on_skip is None:
                    raise IngestError(f"{doc.doc_id}: {_unchunkable(e)}") from e
                on_skip(doc.doc_id, _unchunkable(e))
                continue
            yield from _chunks(doc.doc_id, doc.metadata, parts, next_id)
            next_id += len(parts)


def _unchunkable(e: Exception) -> str:
    return f"cannot be chunked: {type(e).__name__}: {e}"


def _chunks(doc_id: str, metadata: dict[str, Any], parts: list[tuple[str, str]], first_id: int) -> list[Chunk]:
    chunks = []
    for i, (text, splitter_name) in enumerate(parts):
        meta = {**metadata, "file_path": doc_id, "chunk_index": i}
        if splitter_name != "sentence":
            meta["splitter"] = splitter_name
        chunks.append(Chunk(chunk_id=first_id + i, doc_id=doc_id, text=text, metadata=meta))
    return chunks


def sections(text: str, max_chars: int = SECTION_CHARS) -> Iterator[str]:
    """``text`` in pieces of at most ``max_chars``, cut after a blank line, else a line end,
    else a space (looked for in the second half of the window), else anywhere."""
    return stream_sections((text,), max_chars)


def stream_sections(pieces: Iterable[str], max_chars: int = SECTION_CHARS) -> Iterator[str]:
    """The ``sections`` of the text that ``pieces`` make up, read as they come: each cut
    depends only on the next ``max_chars`` characters, so only those and the newest piece
    are held, and the sections are exactly those of the joined text."""
    held, start = "", 0
    for piece in pieces:
        held = held[start:] + piece  # one piece of a whole text: no copy ("" + s is s)
        start = 0
        while len(held) - start > max_chars:
            end = start + max_chars
            cut = -1
            for sep in ("\n\n", "\n", " "):
                cut = held.rfind(sep, start + max_chars // 2, end)
                if cut >= 0:
                    cut += len(sep)
                    break
            cut = end if cut < 0 else cut
            yield held[start:cut]
            start = cut
    yield held[start:]


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
