"""Plain text is streamed into the chunker (issue 16: memory while chunking stays bounded).

The streamed path must give exactly what reading the file whole gives: the same chunks
(ids, texts, metadata), the same encoding and the same skip reasons, and the SHA-256 of
the bytes it chunked. Small read sizes and small sections force every boundary: a
multi-byte character split across two reads, a CRLF or a blank line across a read or a
section cut.
"""

from __future__ import annotations

import codecs
import hashlib
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragserve.build.ingest import Chunker, Skip, chunk_file, read_file, sections, stream_sections
from ragserve.build.textfile import READ_SIZE, TextStream, WholeFileNeeded, decode_text

TEXT = "The Rhine flows through Basel. Cologne has a cathedral. "
MULTI = "Zürich — naïve café ✓ 😀 日本語のテキスト。 "
_CHUNKERS: dict[int, Chunker] = {}


def chunker(section_chars: int = 400) -> Chunker:
    """Real sentence splitters (made once each), counting words, with small sections."""
    if section_chars not in _CHUNKERS:
        _CHUNKERS[section_chars] = Chunker(24, 4, str.split, section_chars=section_chars)
    return _CHUNKERS[section_chars]


def whole(path: Path, c: Chunker, encoding: str | None = None):
    """What the whole-file path gives (``read_file``, then the chunker, as a build did before
    streaming): the chunks and the encoding, or the skip reason."""
    try:
        docs, used = read_file(path, path.name, encoding)
    except Skip as e:
        return "skipped", str(e)
    failed: dict[str, str] = {}
    chunks = list(c.documents(docs, on_skip=failed.__setitem__))
    return ("skipped", failed[path.name]) if failed else (chunks, used)


def streamed(path: Path, c: Chunker, read_size: int, encoding: str | None = None):
    try:
        got = chunk_file(path, path.name, c, encoding, read_size=read_size)
    except Skip as e:
        return "skipped", str(e)
    assert got.documents == 1
    if got.sha256 is not None:
        assert got.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    return got.chunks, got.encoding


FILES = {
    "multibyte.txt": (MULTI * 300).encode("utf-8"),
    "crlf.txt": ("\r\n".join(f"Line {i}: {TEXT}" for i in range(400)) + "\r\n\r\n" + TEXT).encode("utf-8"),
    "no-newlines.txt": (TEXT * 300).encode("utf-8"),
    "no-spaces.txt": ("x" * 5000 + "é" * 3000).encode("utf-8"),
    "long-paragraphs.md": "\n\n".join(TEXT * (20 + 7 * i) for i in range(12)).encode("utf-8"),
    "utf8-bom.txt": codecs.BOM_UTF8 + (MULTI * 100).encode("utf-8"),
    "utf16-bom.txt": codecs.BOM_UTF16_LE + (MULTI * 100).encode("utf-16-le"),
    "utf32-bom.txt": codecs.BOM_UTF32_BE + (MULTI * 50).encode("utf-32-be"),
    "latin1.txt": ("Café résumé naïve à la carte, déjà vu. " * 100).encode("latin-1"),  # charset detection
    "blank.txt": b" \r\n\t\n" * 500,
    "bad-utf16.txt": codecs.BOM_UTF16_LE + (TEXT * 50).encode("utf-16-le") + b"\x00\xdc" + b"a",
    "binary.txt": b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256)) * 20,
    "bom-prefix.txt": codecs.BOM_UTF8[:2],  # two bytes of a UTF-8 mark: not UTF-8 at all
}


@pytest.mark.parametrize("name", sorted(FILES))
@pytest.mark.parametrize("read_size", [1, 3, 7, 4096])
def test_streamed_chunks_are_the_whole_file_chunks(tmp_path, name, read_size):
    path = tmp_path / name
    path.write_bytes(FILES[name])
    c = chunker()
    expected = whole(path, c)
    assert streamed(path, c, read_size) == expected
    if name in ("multibyte.txt", "crlf.txt", "long-paragraphs.md"):
        assert len(expected[0]) > 20  # many sections and chunks, not one


@pytest.mark.parametrize(("forced", "data"), [
    ("cp1252", ("Prices in € — “quoted” " * 200).encode("cp1252")),
    ("shift_jis", ("日本語のテキストです。" * 300).encode("shift_jis")),
    ("utf-8-sig", codecs.BOM_UTF8 + (MULTI * 100).encode("utf-8")),
    ("utf-8", (MULTI * 100).encode("utf-8")[:-1]),  # cut inside a character: skipped, same reason
    ("ascii", (TEXT * 100 + "é").encode("utf-8")),
])
def test_a_forced_encoding_streams_the_same(tmp_path, forced, data):
    path = tmp_path / "forced.txt"
    path.write_bytes(data)
    for read_size in (1, 5, 1 << 20):
        assert streamed(path, chunker(), read_size, forced) == whole(path, chunker(), forced)


def test_default_sections_and_a_real_size_file(tmp_path):
    """The build's own settings (32k sections, 1 MiB reads) over a few sections."""
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(f"Chapter {i}. " + MULTI * 40 + TEXT * 30 for i in range(60)), "utf-8")
    c = Chunker(64, 8, str.split)
    assert streamed(path, c, 1 << 20) == whole(path, c) and len(whole(path, c)[0]) > 100
    assert streamed(path, c, 1000) == whole(path, c)


def test_a_section_that_cannot_be_chunked_gives_the_whole_file_reason(tmp_path):
    def tokenizer(text):
        if "\x07" in text:
            raise ValueError("the tokenizer refuses BEL")
        return text.split()

    path = tmp_path / "bell.txt"
    path.write_text(TEXT * 40 + "ring \x07 " + TEXT * 40)
    c = Chunker(24, 4, tokenizer, section_chars=300)
    assert streamed(path, c, 16) == whole(path, c) == ("skipped", "cannot be chunked: ValueError: the tokenizer "
                                                                  "refuses BEL")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.lists(st.sampled_from(list("ab .,\n\r\t") + ["é", "✓", "😀", "日", "\u2028", "\x85", " word", "\r\n"]),
                     max_size=600).map("".join),
       bom=st.booleans(), read_size=st.integers(1, 64), section_chars=st.sampled_from([40, 97, 256]))
def test_property_streamed_equals_whole_for_any_text(text, bom, read_size, section_chars):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "any.txt"
        path.write_bytes((codecs.BOM_UTF8 if bom else b"") + text.encode("utf-8"))
        c = chunker(section_chars)
        if path.stat().st_size == 0:
            return
        assert streamed(path, c, read_size) == whole(path, c)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64), prefix=st.sampled_from([b"", codecs.BOM_UTF8, codecs.BOM_UTF16_LE,
                                                             codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE]),
       forced=st.sampled_from([None, None, "utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32", "cp1252",
                               "shift_jis", "gb18030", "ascii", "latin-1"]),
       read_size=st.integers(1, 9))
def test_property_stream_decoding_decides_as_decode_text(data, prefix, forced, read_size):
    """Any bytes: the stream gives decode_text's text and encoding, or hands the file to
    the whole-file path (never a different text, a different reason or a builtin error)."""
    data = prefix + data
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "any.txt"
        path.write_bytes(data)
        stream = TextStream(path, forced, read_size)
        try:
            expected = decode_text(data, forced)
        except Skip as e:
            expected = str(e)
        try:
            got = "".join(stream), stream.encoding
        except Skip as e:
            got = str(e)
        except WholeFileNeeded:
            # Only where decode_text refuses the file too, detects a charset (not UTF-8), or
            # reads forced UTF-16/32 without a mark in native order (the incremental
            # decoders refuse that).
            if not isinstance(expected, str) and forced is None:
                with pytest.raises(UnicodeDecodeError):
                    data.decode("utf-8-sig")
            elif not isinstance(expected, str):
                marks = {"utf-16": (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE),
                         "utf-32": (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)}
                assert forced in marks and not data.startswith(marks[forced])
            return
        assert got == expected
        if not isinstance(got, str):
            assert stream.sha256 == hashlib.sha256(data).hexdigest()
            assert stream.has_text == bool(expected[0].strip())


@given(text=st.lists(st.sampled_from(["a", "b", " ", "\n", "\n\n"]), max_size=400).map("".join),
       cuts=st.lists(st.integers(0, 600)),
       max_chars=st.integers(2, 50))
def test_property_stream_sections_are_the_sections_of_the_joined_text(text, cuts, max_chars):
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert list(stream_sections(pieces, max_chars)) == list(sections(text, max_chars))


class _FirstLine:
    """A splitter that keeps a few characters of each section: what the test measures is
    the reading and sectioning, not the chunk texts a real splitter would keep."""

    def split_text(self, section: str) -> list[str]:
        return [section[:40]]


def test_memory_while_chunking_a_30_mb_file_does_not_scale_with_the_file(tmp_path):
    """tracemalloc peak over what stays allocated (the chunks): one read, one decoded
    piece and a section or two, never the file's bytes or its text (the whole-file path
    holds both: over 60 MB here)."""
    path = tmp_path / "big.txt"
    line = (TEXT * 3 + "é ✓\n").encode("utf-8")
    with open(path, "wb") as f:
        for _ in range(30 * 2**20 // (len(line) * 1000)):
            f.write(line * 1000)
    size = path.stat().st_size
    c = Chunker(256, 32, str.split, splitter=_FirstLine())
    tracemalloc.start()
    try:
        got = chunk_file(path, "big.txt", c)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    transient = peak - current
    assert len(got.chunks) >= size // (2 * c.section_chars)  # every section was seen
    assert got.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # A read (64 KiB), its text, the text held for cutting, a section: 0.4 MiB measured.
    bound = 5 * c.section_chars * 4 + 8 * READ_SIZE
    assert transient < bound, f"{transient / 2**20:.1f} MiB for a {size / 2**20:.0f} MB file"


def test_a_build_hashes_what_it_streams_and_flags_a_file_changed_since_the_scan(tmp_path, monkeypatch):
    """``gather`` (the build's read step) records each file's SHA-256 from the scan only when
    the bytes it streamed and chunked have that hash; text files are not read again to
    hash them (the whole-file path read each file three times: scan, read, hash again)."""
    import ragserve.build.incremental as incremental
    from ragserve.index.manifest import sha256_file

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(MULTI * 200, "utf-8")
    (src / "b.md").write_text(TEXT * 200 + "\r\n\r\n" + MULTI, "utf-8")
    (src / "c.html").write_text(f"<html><body><p>{TEXT}</p></body></html>")
    (src / "d.txt").write_text(TEXT * 100)
    files = incremental.scan_source(src)
    plan = incremental.plan_build(files, tmp_path / "idx", identity={}, chunking={}, encoding=None)
    (src / "d.txt").write_text(TEXT * 100 + "An edit after the scan.")
    rehashed: list[str] = []
    monkeypatch.setattr(incremental, "sha256_file", lambda p: rehashed.append(p.name) or sha256_file(p))
    g = incremental.gather(plan, chunk_size=24, chunk_overlap=4, tokenizer=str.split, encoding=None, read_size=5)
    assert rehashed == ["c.html"]  # read whole: hashed again after reading, as before
    assert [o.status for o in g.outcomes] == ["ok"] * 4
    assert {d: r["sha256"] for d, r in g.corpus.items()} == {
        "a.txt": sha256_file(src / "a.txt"), "b.md": sha256_file(src / "b.md"),
        "c.html": sha256_file(src / "c.html"), "d.txt": None}  # d.txt: hashed again next build
    c = Chunker(24, 4, str.split)
    expected = [ch for f in ("a.txt", "b.md") for ch in whole(src / f, c)[0]]
    assert [(ch.doc_id, ch.text, ch.metadata) for ch in g.chunks[:len(expected)]] == [
        (ch.doc_id, ch.text, ch.metadata) for ch in expected]
    assert [ch.chunk_id for ch in g.chunks] == list(range(len(g.chunks))) == g.new_ids
