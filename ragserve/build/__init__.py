"""Building an index: reading a corpus, chunking, embedding, writing a version.

- ``ingest.py``: files to documents to chunks; ``textfile.py``: decoding and streaming text;
- ``incremental.py``: what changed since the previous build, and what can be reused;
- ``builder.py``: full and incremental builds (``build_index``);
- ``summary.py``: the build report printed by the CLI; ``notify.py``: telling a running
  server to reload the new version.
"""
