"""Bytes of a text file to str: whole (``decode_text``) or streamed (``TextStream``), with
one rule for which codec to use, so that both give the same text and the same encoding.

The rule (``_codec``): a UTF-16 or UTF-32 byte-order mark decides (its NUL bytes are not
"binary content"); else NUL bytes in the first 8 KiB mean binary; else a forced encoding;
else UTF-8 (a UTF-8 mark is dropped), and when that fails, charset detection
(charset-normalizer) over the whole file.

``TextStream`` reads a file ``read_size`` bytes at a time through an incremental decoder
(a character split across two reads is held back until its last byte arrives) and hashes
every byte it reads. It only takes the path where the text decodes: on the first decode
error it raises ``WholeFileNeeded`` and the caller reads the file whole, so that charset
detection (which needs all the bytes) and every skip reason stay exactly what
``decode_text`` says.
"""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ragserve.errors import IngestError

# NOTE: short legacy texts are ambiguous between the Western code pages; cp1252 is by far
# the most common, so it wins when it decodes with nearly as little "chaos" as the best.
_PREFERRED_LEGACY = "cp1252"
_CHAOS_MARGIN = 0.1
# UTF-32 first: its little-endian mark starts with UTF-16's. The codecs drop the mark.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
HEAD_BYTES = 8192
"""Bytes looked at for a byte-order mark and for NUL bytes (binary content)."""
READ_SIZE = 1 << 16
"""Bytes a ``TextStream`` reads at a time: about two sections' worth, so that what is held
while cutting sections is a few sections, not a large read (a 30 MB file: 0.4 MiB at
64 KiB, 8.7 MiB at 1 MiB; equally fast)."""


def check_encoding(encoding: str | None) -> None:
    """A forced encoding Python has no codec for is refused before any file is hashed or
    read (it would otherwise fail inside the first file's decode, as a bare LookupError)."""
    if encoding is None:
        return
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise IngestError(f"--encoding {encoding!r} is not a text encoding Python knows "
                          "(e.g. utf-8, latin-1, cp1252, shift_jis); leave it out to detect each file's") from None


class Skip(Exception):
    """A file is not ingested; the message is the reason shown in the summary."""


class WholeFileNeeded(Exception):
    """The stream cannot decide this file (it does not decode as streamed): read it whole."""


def _codec(head: bytes, forced: str | None) -> tuple[str | None, str]:
    """The codec to decode with (None: UTF-8, else charset detection) and the encoding to
    report, from the first bytes of a file. Raises Skip for binary content."""
    for bom, codec in () if forced else _BOMS:
        if head.startswith(bom):
            return codec, codec
    if b"\x00" in head[:HEAD_BYTES]:
        raise Skip("undecodable text: binary content (NUL bytes)")
    if forced:
        return forced, forced
    return None, "utf-8"


def decode_text(data: bytes, forced: str | None = None) -> tuple[str, str]:
    """Decode bytes to text; returns (text, encoding). Raises Skip when it cannot."""
    codec, used = _codec(data, forced)
    if codec is not None:
        try:
            return data.decode(codec), used
        except UnicodeDecodeError as e:
            what = f"not valid {codec}" if forced else f"a {codec} byte-order mark, but not valid {codec}"
            raise Skip(f"undecodable text: {what} ({e.reason} at byte {e.start})") from None
    try:
        return data.decode("utf-8-sig"), used
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


class TextStream:
    """The decoded text of one file, in pieces of at most ``read_size`` bytes' worth.

    Iterate it once; afterwards ``encoding``, ``sha256`` (of every byte read) and
    ``has_text`` (anything but whitespace) describe what was read. Raises Skip (binary,
    unreadable) or ``WholeFileNeeded`` (a decode error: let ``decode_text`` decide).

    **Usage:** ``s = TextStream(path); text = "".join(s); s.sha256``
    """

    def __init__(self, path: Path, forced: str | None = None, read_size: int = READ_SIZE) -> None:
        if read_size < 1:
            raise ValueError(f"read_size must be >= 1, got {read_size}")
        self.path, self.forced, self.read_size = Path(path), forced, read_size
        self.encoding: str | None = None
        self.sha256: str | None = None
        self.has_text = False

    def __iter__(self) -> Iterator[str]:
        try:
            with open(self.path, "rb") as f:
                codec, used = _codec(f.read(HEAD_BYTES), self.forced)
                f.seek(0)
                yield from self._decode(f, codec)
        except OSError as e:
            raise Skip(f"unreadable: {e.strerror or e}") from None
        self.encoding = used

    def _decode(self, f: BinaryIO, codec: str | None) -> Iterator[str]:
        b"".decode(codec or "utf-8")  # an unknown or non-text codec fails as bytes.decode does
        # NOTE: UTF-8 with its mark dropped by hand rather than by "utf-8-sig", whose
        # incremental decoder returns "" for a file of one or two bytes of a mark, where
        # bytes.decode raises (and the whole-file path then runs charset detection).
        sig = codec is None or codecs.lookup(codec).name == "utf-8-sig"
        decoder = codecs.getincrementaldecoder("utf-8" if sig else codec)()  # type: ignore[arg-type]
        digest = hashlib.sha256()
        first = sig
        while True:
            block = f.read(self.read_size)
            digest.update(block)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeError:  # NOTE: also "UTF-16 stream does not start with BOM", which
                raise WholeFileNeeded(str(self.path)) from None  # bytes.decode reads as native order
            if first and text:
                text, first = text.removeprefix("\ufeff"), False
            if text:
                self.has_text = self.has_text or not text.isspace()
                yield text
            if not block:
                break
        self.sha256 = digest.hexdigest()
