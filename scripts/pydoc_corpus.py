"""Write CPython's own help topics (``pydoc_data.topics``) as a corpus folder.

One ``.txt`` document per topic. Every CPython ships this text, so the demo needs no
download. Idempotent: an existing, complete folder is reused.

Usage: python scripts/pydoc_corpus.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path


def write_corpus(out: Path) -> tuple[int, bool]:
    """Returns (number of documents, written_now)."""
    from pydoc_data.topics import topics

    out.mkdir(parents=True, exist_ok=True)
    expected = {f"{name}.txt": text for name, text in topics.items()}
    if all((out / n).is_file() for n in expected) and len(list(out.glob("*.txt"))) == len(expected):
        return len(expected), False
    for name, text in expected.items():
        (out / name).write_text(text, encoding="utf-8")
    return len(expected), True


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    n, written = write_corpus(Path(sys.argv[1]))
    print(f"{n} pydoc topics {'written to' if written else 'already in'} {sys.argv[1]}")
