"""The index folder format: what is on disk, and the checks before it is served.

- ``manifest.py``: ``manifest.json`` (files, hashes, the fingerprint);
- ``verify.py``: every file against the manifest, then the structure;
- ``structure.py``: files that agree with each other (dimensions, counts, offsets);
- ``versions.py``: versioned folders behind a link flipped atomically;
- ``writer.py``: the one writer of an index folder.
"""
