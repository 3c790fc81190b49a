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
undecodable, fails to parse, or is of a type no reader handles.
"""

from __future__ import annotations

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
        raise Skip(f"parse error: {type(e).__name__}: {e}") from None
    docs = []
    for page in pages:
        if page.text.strip():
            label = page.metadata.get("page_label", str(len(docs) + 1))
            docs.append(Document(doc_id, page.text, {"page_label": label}))
    if not docs:
        raise Skip("empty: no extractable text (a scanned PDF needs OCR first)")
    return docs


def read_file(path: Path, doc_id: str, encoding: str | None = None) -> tuple[list[Document], str | None]:
    """Documents of one file and the text encoding used. Raises Skip with the reason."""
    suffix = path.suffix.lower()
    if any(part.startswith(".") for part in Path(doc_id).parts):
        raise Skip("hidden file or folder")
    if suffix not in SUPPORTED:
        raise Skip(f"unsupported file type {suffix or '(no extension)'!r}; supported: {', '.join(sorted(SUPPORTED))}")
    try:
        if path.stat().st_size == 0:
            raise Skip("empty: 0 bytes")
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


def read_corpus(source: Path, encoding: str | None = None) -> tuple[list[Document], list[FileOutcome]]:
    root, files = iter_files(source)
    docs: list[Document] = []
    outcomes: list[FileOutcome] = []
    for path in files:
        doc_id = path.relative_to(root).as_posix()
        try:
            file_docs, used = read_file(path, doc_id, encoding)
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
) -> Iterator[Chunk]:
    """Split with llama-index's SentenceSplitter; chunk ids are 0..n-1 in corpus order."""
    with warnings.catch_warnings():  # llama-index's pydantic models warn on import
        warnings.simplefilter("ignore")
        from llama_index.core.node_parser import SentenceSplitter

    splitter = SentenceSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap, tokenizer=tokenizer)
    next_id = 0
    for doc in docs:
        for i, text in enumerate(splitter.split_text(doc.text)):
            if text.strip():
                meta = {**doc.metadata, "file_path": doc.doc_id, "chunk_index": i}
                yield Chunk(chunk_id=next_id, doc_id=doc.doc_id, text=text, metadata=meta)
                next_id += 1
