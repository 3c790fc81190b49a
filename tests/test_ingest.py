import os

import pytest

from ragserve.build.ingest import chunk_documents, decode_text, read_corpus
from ragserve.errors import IngestError

LATIN1 = "Café résumé naïve à la carte, déjà vu. Le garçon a mangé une crêpe à Zürich."


@pytest.fixture
def messy_corpus(tmp_path):
    (tmp_path / "utf8.txt").write_text("Plain UTF-8 text about the Rhine. ✓", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes(LATIN1.encode("latin-1"))
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.md").write_text("  \n\n\t ")
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + os.urandom(300))
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    (tmp_path / "page.html").write_text("<html><head><title>T</title><style>p{}</style><script>x=1</script>"
                                        "</head><body><h1>Heading</h1><p>Body text.</p></body></html>")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "notes.md").write_text("# Notes\n\nNested file.")
    (tmp_path / ".hidden.txt").write_text("secret")
    return tmp_path


def test_every_file_has_an_outcome_with_a_reason(messy_corpus):
    docs, outcomes = read_corpus(messy_corpus)
    by = {o.path: o for o in outcomes}
    assert set(by) == {"utf8.txt", "latin1.txt", "empty.txt", "blank.md", "binary.txt", "image.png",
                       "page.html", "broken.pdf", "sub/notes.md", ".hidden.txt"}
    assert by["utf8.txt"].status == "ok" and by["utf8.txt"].encoding == "utf-8"
    assert by["latin1.txt"].status == "ok" and by["latin1.txt"].encoding in ("cp1252", "latin_1", "iso8859_15")
    assert by["empty.txt"].reason.startswith("empty")
    assert by["blank.md"].reason.startswith("empty")
    assert by["binary.txt"].reason.startswith("undecodable text")
    assert "unsupported file type '.png'" in by["image.png"].reason
    assert by["broken.pdf"].reason.startswith("parse error")
    assert by["sub/notes.md"].status == "ok"
    assert by[".hidden.txt"].reason == "hidden file or folder"
    text = {d.doc_id: d.text for d in docs}
    assert text["latin1.txt"] == LATIN1
    assert "Body text." in text["page.html"] and "x=1" not in text["page.html"] and "p{}" not in text["page.html"]


def test_pdf_pages_are_documents(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    with PdfPages(tmp_path / "two.pdf") as pdf:
        for words in ("The Rhine flows through Basel.", "Cologne has a cathedral."):
            fig = plt.figure()
            fig.text(0.1, 0.5, words)
            pdf.savefig(fig)
            plt.close(fig)
    docs, outcomes = read_corpus(tmp_path)
    assert outcomes[0].status == "ok" and outcomes[0].documents == 2
    assert [d.metadata["page_label"] for d in docs] == ["1", "2"]
    assert "Cologne" in docs[1].text


def test_decode_text_forced_encoding_and_failures():
    assert decode_text("ä".encode("latin-1"), "latin-1") == ("ä", "latin-1")
    from ragserve.build.ingest import Skip

    with pytest.raises(Skip, match="not valid utf-8"):
        decode_text(b"\xff\xfe\xfa", "utf-8")
    assert decode_text("\ufeffBOM".encode("utf-8")) == ("BOM", "utf-8")


def test_missing_source_is_an_ingest_error(tmp_path):
    with pytest.raises(IngestError, match="no such file"):
        read_corpus(tmp_path / "nope")


def test_chunks_have_consecutive_ids_and_respect_size():
    from ragserve.build.ingest import Document

    docs = [Document("a.txt", "One sentence here. " * 200), Document("b.txt", "Short.")]
    chunks = list(chunk_documents(docs, chunk_size=64, chunk_overlap=8, tokenizer=str.split))
    assert [c.chunk_id for c in chunks] == list(range(len(chunks)))
    assert chunks[-1].doc_id == "b.txt"
    assert all(len(c.text.split()) <= 64 for c in chunks)
    assert chunks[0].metadata["file_path"] == "a.txt"
