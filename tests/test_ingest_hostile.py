"""Builds that survive hostile corpora: huge files, files the splitter cannot take, UTF-16
with a BOM, broken PDFs. Every file gets an outcome; one file never loses the build."""

import codecs

import pytest

from ragserve.build.ingest import (
    SECTION_CHARS,
    Document,
    chunk_documents,
    fallback_split,
    read_corpus,
    sections,
)
from ragserve.config import RAGConfig
from ragserve.errors import ConfigError, IngestError

TEXT = "The Rhine flows through Basel. Cologne has a cathedral. "


@pytest.mark.parametrize(("codec", "bom"), [("utf-16-le", codecs.BOM_UTF16_LE), ("utf-16-be", codecs.BOM_UTF16_BE),
                                            ("utf-32-le", codecs.BOM_UTF32_LE), ("utf-32-be", codecs.BOM_UTF32_BE)])
def test_text_with_a_utf16_or_utf32_bom_is_read(tmp_path, codec, bom):
    (tmp_path / "wide.txt").write_bytes(bom + "Zürich — ✓ wide text".encode(codec))
    docs, outcomes = read_corpus(tmp_path)
    assert outcomes[0].status == "ok", outcomes[0].reason
    assert docs[0].text == "Zürich — ✓ wide text" and outcomes[0].encoding == codec[:6]


def test_a_bom_with_a_broken_body_says_so(tmp_path):
    (tmp_path / "odd.txt").write_bytes(codecs.BOM_UTF16_LE + b"a\x00b")  # an odd number of bytes
    _, outcomes = read_corpus(tmp_path)
    assert outcomes[0].status == "skipped" and "utf-16 byte-order mark, but not valid utf-16" in outcomes[0].reason


def test_a_broken_pdf_gets_a_readable_reason(tmp_path):
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    _, outcomes = read_corpus(tmp_path)
    reason = outcomes[0].reason
    assert reason.startswith("parse error: PdfStreamError") and "RetryError" not in reason and "Future" not in reason


def test_files_over_the_size_limit_are_skipped_with_a_reason(tmp_path):
    (tmp_path / "small.txt").write_text(TEXT)
    (tmp_path / "big.txt").write_text(TEXT * 40_000)  # 2.2 MB
    docs, outcomes = read_corpus(tmp_path, max_bytes=2**20)
    by = {o.path: o for o in outcomes}
    assert by["small.txt"].status == "ok" and [d.doc_id for d in docs] == ["small.txt"]
    assert by["big.txt"].status == "skipped"
    assert by["big.txt"].reason == "too large: 2.1 MB, over the limit of 1 MB (chunk.max_file_mb; raise it, or split the file)"


def test_the_size_limit_is_validated():
    assert RAGConfig().chunk.max_file_mb == 100
    with pytest.raises(ConfigError, match="chunk.max_file_mb"):
        RAGConfig().replace(chunk={"max_file_mb": -1})


def test_sections_are_bounded_cut_at_boundaries_and_lose_nothing():
    text = ("word " * 3000 + "\n") * 30 + "x" * 100_000 + "\n\nend"
    parts = list(sections(text, 10_000))
    assert "".join(parts) == text
    assert all(len(p) <= 10_000 for p in parts)
    assert all(p.endswith(("\n", " ")) for p in parts[:20])  # where there is a boundary, cut there
    assert list(sections("short", 10_000)) == ["short"]


def test_the_splitter_never_sees_more_than_a_section_of_a_huge_document():
    """The memory bound: the tokenizer and the sentence splitter get one section at a time
    (a 50 MB file used to be tokenised whole: 7.2 GiB RSS)."""
    seen = []

    def counting(text):
        seen.append(len(text))
        return text.split()

    big = Document("big.txt", (TEXT * 50 + "\n") * 400)  # 1.1 MB, one document
    chunks = list(chunk_documents([big, Document("b.txt", "Short.")], 64, 8, counting))
    assert max(seen) <= SECTION_CHARS
    assert [c.chunk_id for c in chunks] == list(range(len(chunks)))
    assert [c.metadata["chunk_index"] for c in chunks[:-1]] == list(range(len(chunks) - 1))
    assert all(len(c.text.split()) <= 64 for c in chunks) and chunks[-1].doc_id == "b.txt"


def test_a_section_the_sentence_splitter_fails_on_is_chunked_by_the_fallback(monkeypatch):
    import nltk.redos

    # The regex guard that killed the 50 MB build: make it trip on anything.
    monkeypatch.setattr(nltk.redos, "DEFAULT_TIMEOUT", 1e-6)
    docs = [Document("a.txt", TEXT * 400), Document("b.txt", "Short.")]
    chunks = list(chunk_documents(docs, 64, 8, str.split))
    fallback = [c for c in chunks if c.doc_id == "a.txt"]
    assert fallback and all(c.metadata["splitter"] == "fallback" for c in fallback)
    assert " ".join(c.text for c in fallback).split() == (TEXT * 400).split()  # nothing lost
    assert all(len(c.text.split()) <= 64 for c in fallback)
    assert chunks[-1].doc_id == "b.txt" and "splitter" not in chunks[-1].metadata


def test_fallback_cuts_words_longer_than_a_chunk():
    blob = "A" * 1000
    out = fallback_split(f"before {blob} after", 64, lambda t: list(t))  # one token per character
    assert "".join(out).replace(" ", "") == f"before{blob}after"
    assert all(len(p.replace(" ", "")) <= 64 for p in out)


def test_a_document_that_cannot_be_chunked_is_reported_and_the_rest_kept():
    def tokenizer(text):
        if "\x07" in text:
            raise ValueError("the tokenizer refuses BEL")
        return text.split()

    docs = [Document("a.txt", TEXT), Document("bad.txt", "ring \x07 " * 50), Document("c.txt", TEXT)]
    skipped = {}
    chunks = list(chunk_documents(docs, 64, 8, tokenizer, on_skip=skipped.__setitem__))
    assert [c.doc_id for c in chunks] == ["a.txt", "c.txt"] and [c.chunk_id for c in chunks] == [0, 1]
    assert skipped == {"bad.txt": "cannot be chunked: ValueError: the tokenizer refuses BEL"}
    with pytest.raises(IngestError, match="bad.txt: cannot be chunked"):
        list(chunk_documents(docs, 64, 8, tokenizer))


@pytest.mark.integration
def test_build_keeps_going_past_files_it_cannot_take(tmp_path, embedder):
    from ragserve.build.builder import build_index
    from ragserve.index.verify import verify

    class Picky:
        """The real embedder, whose tokenizer fails on one file's text."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def token_counter(self):
            count = self.inner.token_counter()

            def picky(text):
                if "\x07" in text:
                    raise ValueError("the tokenizer refuses BEL")
                return count(text)

            return picky

    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text(TEXT * 3)
    (src / "wide.txt").write_bytes(codecs.BOM_UTF16_LE + (TEXT * 2).encode("utf-16-le"))
    (src / "huge.txt").write_text(TEXT * 40_000)
    (src / "bell.txt").write_text("ring \x07 " * 50)
    (src / "broken.pdf").write_bytes(b"%PDF-1.4 nope")
    report = build_index(src, tmp_path / "idx", RAGConfig().replace(chunk={"max_file_mb": 1}), embedder=Picky(embedder))
    by = {f.path: f for f in report.files}
    assert by["good.txt"].status == "ok" and by["wide.txt"].status == "ok" and by["wide.txt"].chunks >= 1
    assert by["huge.txt"].status == "skipped" and by["huge.txt"].reason.startswith("too large")
    assert by["bell.txt"].status == "skipped" and "cannot be chunked: ValueError" in by["bell.txt"].reason
    assert by["broken.pdf"].reason.startswith("parse error: PdfStreamError")
    m = verify(tmp_path / "idx").data
    assert m["counts"]["files_skipped"] == 3 and {s["path"] for s in m["skipped"]} == {"huge.txt", "bell.txt",
                                                                                        "broken.pdf"}
