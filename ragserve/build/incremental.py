"""What an incremental build keeps, re-embeds and drops: the plan, from file hashes.

Each source file is identified by its path (relative to the source folder) and the
SHA-256 of its bytes; the manifest's ``corpus`` section records both with the file's
chunk range. A file whose path and hash are unchanged keeps its chunks and vectors (read
back from the previous index: float16 codes decode exactly, nothing is re-embedded); a
changed or new file is read, chunked and embedded; a file that is gone disappears.

Chunk-id order is the same for every build: files in ``iter_files`` order (sorted
paths), each file's chunks in the splitter's order. The chunks of a file are therefore
contiguous, and an incremental build lays them out exactly as a full build of the same
folder would, so both give the same chunk ids, texts and vectors (up to float16 rounding)
and the same search results.

Reading is split from the ordering: ``read_source`` reads and chunks one file on its own,
and ``assemble`` numbers the chunks in that order whatever order the reads finished in,
so a local build (``gather``) and a Ray build (``ray/build.py``) give the same chunks.

The previous index is only reused when it was built with the same embedding model (its
identity), the same chunking and the same forced text encoding; otherwise the plan is a
full build and says why. It is verified first like an index being opened (hashes,
structure, chunk ranges, docstore records, a sample of vectors; ``finish_build`` checks
every vector it reads back): one that fails is refused with its ``IndexIntegrityError``
and left untouched, never dropped or half reused (``--full`` rebuilds without reading it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ragserve.build.ingest import SUPPORTED, Chunker, FileChunks, FileOutcome, Skip, chunk_file, iter_files
from ragserve.build.textfile import READ_SIZE
from ragserve.errors import IndexError_, IndexIntegrityError
from ragserve.index.manifest import Manifest, sha256_file
from ragserve.index.verify import verify
from ragserve.retrieval.docstore import LazyDocStore
from ragserve.types import Chunk

Action = Literal["unchanged", "changed", "added", "retried"]
"""``retried``: skipped last time with the same content, read again (its reason may be gone)."""


@dataclass(frozen=True)
class SourceFile:
    doc_id: str
    """Path relative to the source folder, with ``/`` separators (the chunks' doc_id)."""
    path: Path
    sha256: str | None
    """None when the file is not hashed: refused by its name (hidden, unsupported type,
    which the reader decides without reading it) or unreadable."""
    bytes: int = 0


@dataclass
class BuildPlan:
    """Which files a build reads and embeds, and which it takes from the previous index."""

    mode: Literal["full", "incremental"]
    reason: str
    """Why the build is full (empty for an incremental plan)."""
    files: list[SourceFile]
    actions: dict[str, Action] = field(default_factory=dict)
    """Per hashed file (doc_id): unchanged, changed or added. Full plans: all added."""
    deleted: list[str] = field(default_factory=list)
    previous: Manifest | None = None
    """The index an incremental plan reuses."""

    def names(self, action: Action) -> list[str]:
        return [d for d, a in self.actions.items() if a == action]

    @property
    def records(self) -> dict[str, dict[str, Any]]:
        """The previous manifest's per-file records (empty for a full plan)."""
        return self.previous.data["corpus"]["files"] if self.previous is not None else {}

    def reused(self, doc_id: str) -> dict[str, Any] | None:
        """The previous record of an unchanged file, whose outcome and chunks are kept."""
        return self.records.get(doc_id) if self.actions.get(doc_id) == "unchanged" else None

    @property
    def chunks_kept(self) -> int:
        return sum(r["chunks"] for d in self.names("unchanged") if (r := self.records[d])["status"] == "ok")

    @property
    def counts(self) -> dict[str, int]:
        return {"unchanged": len(self.names("unchanged")), "changed": len(self.names("changed")),
                "added": len(self.names("added")), "deleted": len(self.deleted)}

    @property
    def changes_nothing(self) -> bool:
        c = self.counts
        return self.mode == "incremental" and c["changed"] == c["added"] == c["deleted"] == 0

    def describe(self) -> str:
        """One line for the build summary."""
        c = self.counts
        if self.mode == "full":
            return f"full build ({self.reason}): {len(self.actions)} files to read and embed"
        return (f"incremental: files unchanged {c['unchanged']}, changed {c['changed']}, added {c['added']}, "
                f"deleted {c['deleted']}; {self.chunks_kept} chunks kept from the previous index")


def scan_source(source: Path | str, progress: Any = None) -> list[SourceFile]:
    """Every file under ``source`` in chunk-id order, hashed unless its name alone
    decides that it is skipped (hidden files such as a ``.git`` folder are never read)."""
    root, paths = iter_files(Path(source))
    files = []
    for i, path in enumerate(paths):
        doc_id = path.relative_to(root).as_posix()
        hidden = any(part.startswith(".") for part in Path(doc_id).parts)
        sha, size = None, 0
        if not hidden and path.suffix.lower() in SUPPORTED:
            try:
                sha, size = sha256_file(path), path.stat().st_size
            except OSError:
                pass  # unreadable: the reader reports why
        files.append(SourceFile(doc_id, path, sha, size))
        if progress and (i % 256 == 255 or i == len(paths) - 1):
            progress("hash", i + 1, len(paths))
    return files


def plan_build(files: list[SourceFile], out: Path, *, identity: dict[str, Any], chunking: dict[str, Any],
               encoding: str | None, full: bool = False) -> BuildPlan:
    """Compare the source files with the index at ``out``: incremental when it can be
    reused, else full with the reason."""
    hashed = [f for f in files if f.sha256 is not None]
    previous, reason = _reusable(out, identity, chunking, encoding, full)
    if previous is None:
        return BuildPlan("full", reason, files, {f.doc_id: "added" for f in hashed})
    records = previous.data["corpus"]["files"]
    actions: dict[str, Action] = {}
    for f in hashed:
        old = records.get(f.doc_id)
        # A file skipped last time is read again: the reason may be gone (a size limit raised,
        # a reader fixed); the skip is cheap to decide again, and only a read file is embedded.
        same = old is not None and old["sha256"] == f.sha256
        actions[f.doc_id] = ("added" if old is None else "changed" if not same
                             else "unchanged" if old["status"] == "ok" else "retried")
    present = {f.doc_id for f in files}
    # A file that is still there but can no longer be hashed (unreadable) counts as changed.
    actions.update({d: "changed" for d in records if d in present and d not in actions})
    deleted = sorted(d for d in records if d not in present)
    return BuildPlan("incremental", "", files, actions, deleted, previous)


def _reusable(out: Path, identity: dict[str, Any], chunking: dict[str, Any], encoding: str | None,
              full: bool) -> tuple[Manifest | None, str]:
    """The previous index if an incremental build may reuse it, else None and why not."""
    if full:
        return None, "--full was given"
    if not out.exists() and not out.is_symlink():
        return None, "no index at this path yet"
    try:
        previous = verify(out)  # every file hashed, the files checked against each other
    except IndexIntegrityError as e:
        # A damaged or inconsistent index is refused, not silently replaced: nothing of it is
        # read or changed, and the user decides (its chunk ranges are what the build reuses).
        raise IndexIntegrityError(e.path, f"{e.detail}; the previous index at {out} is left as it is and "
                                  "nothing is reused from it: repair or move it, or rebuild with --full") from None
    except IndexError_ as e:
        return None, f"the previous index cannot be reused: {e}"
    data = previous.data
    if "corpus" not in data:
        return None, "the previous index records no per-file hashes (built before incremental builds, or from documents)"
    built = data["embedding"]
    if built.get("identity") != identity.get("identity"):
        return None, (f"embedding model changed: {built.get('name')} ({str(built.get('identity'))[:12]}) → "
                      f"{identity.get('name')} ({str(identity.get('identity'))[:12]})")
    if data["chunking"] != chunking:
        diff = ", ".join(f"{k} {data['chunking'].get(k)} → {v}" for k, v in chunking.items()
                         if data["chunking"].get(k) != v)
        return None, f"chunking changed: {diff}"
    if data["corpus"].get("encoding") != encoding:
        return None, f"forced text encoding changed: {data['corpus'].get('encoding')} → {encoding}"
    return previous, ""


@dataclass
class Gathered:
    """The chunks of the new index in chunk-id order, and where their vectors come from."""

    chunks: list[Chunk]
    outcomes: list[FileOutcome]
    corpus: dict[str, dict[str, Any]]
    """Per hashed file: sha256, bytes, status (and reason), encoding, documents, first_chunk, chunks."""
    documents: int
    kept: list[tuple[int, int, int]]
    """Runs of vectors taken from the previous index: (new first id, old first id, count)."""
    new_ids: list[int]
    """Chunk ids whose text is embedded by this build, ascending."""


@dataclass(frozen=True)
class FileRead:
    """One source file as ``read_source`` left it: chunked, or skipped with the reason."""

    doc_id: str
    got: FileChunks | None
    skip: str = ""
    unstable: bool = False
    """The file changed between hashing and reading: its hash is not recorded."""


def files_to_read(plan: BuildPlan) -> list[SourceFile]:
    """The files a build reads and chunks (all but the unchanged ones), in chunk-id order."""
    return [f for f in plan.files if plan.reused(f.doc_id) is None]


def read_source(f: SourceFile, chunker: Chunker, encoding: str | None, max_bytes: int = 0,
                read_size: int = READ_SIZE) -> FileRead:
    """Read and chunk one file (``chunk_file``); a Skip becomes the outcome's reason. Depends
    only on its arguments, so the files of a build may be read anywhere, in any order
    (``ray/build.py`` reads them in Ray tasks), and ``assemble`` still gives one result."""
    try:
        got = chunk_file(f.path, f.doc_id, chunker, encoding, max_bytes, read_size)
    except Skip as e:
        return FileRead(f.doc_id, None, str(e))
    # A streamed file was hashed as it was read: the hash is of the very bytes chunked.
    unstable = f.sha256 is not None and (got.sha256 or _sha_or_none(f.path)) != f.sha256
    return FileRead(f.doc_id, got, unstable=unstable)


def gather(plan: BuildPlan, *, chunk_size: int, chunk_overlap: int, tokenizer: Any,
           encoding: str | None, max_bytes: int = 0, read_size: int = READ_SIZE) -> Gathered:
    """Read and chunk what the plan says to, take the rest from the previous index.
    ``max_bytes`` > 0 skips larger files (``chunk.max_file_mb``); a file none of whose
    documents can be chunked is skipped with the reason, and the build goes on.

    Files are read and chunked one at a time, plain text streamed (``chunk_file``): what
    is held is the chunks, never the texts of the files. NOTE: the chunks of every file
    (texts included) are still all held until they are embedded and written.
    """
    chunker = Chunker(chunk_size, chunk_overlap, tokenizer)
    reads = [read_source(f, chunker, encoding, max_bytes, read_size) for f in files_to_read(plan)]
    return assemble(plan, reads)


def assemble(plan: BuildPlan, reads: list[FileRead]) -> Gathered:
    """The chunks of the new index in chunk-id order: files in the plan's order, each
    file's chunks numbered on from the previous file's, whatever order ``reads`` came in.
    Unchanged files are taken from the previous index; ``reads`` holds the rest."""
    read = {r.doc_id: r for r in reads}
    store = LazyDocStore(plan.previous.folder) if plan.previous is not None else None
    out = Gathered([], [], {}, 0, [], [])
    try:
        for f in plan.files:
            old = plan.reused(f.doc_id)
            start = len(out.chunks)
            r = read.pop(f.doc_id, None)
            if old is not None and old["status"] == "ok":
                out.kept.append((start, old["first_chunk"], old["chunks"]))
                out.chunks.extend(Chunk(start + i, c.doc_id, c.text, c.metadata) for i, c in enumerate(
                    store.get_many(range(old["first_chunk"], old["first_chunk"] + old["chunks"]))))  # type: ignore[union-attr]
                outcome = FileOutcome(f.doc_id, "ok", encoding=old["encoding"], documents=old["documents"],
                                      chunks=old["chunks"])
            elif old is not None:
                outcome = FileOutcome(f.doc_id, "skipped", old["reason"])
            elif r is None:
                raise ValueError(f"{f.doc_id}: the plan reads this file, but no read of it was given")
            elif r.got is None:
                outcome = FileOutcome(f.doc_id, "skipped", r.skip)
            else:
                got = r.got
                out.new_ids.extend(range(start, start + len(got.chunks)))
                out.chunks.extend(Chunk(start + i, c.doc_id, c.text, c.metadata) for i, c in enumerate(got.chunks))
                outcome = FileOutcome(f.doc_id, "ok", encoding=got.encoding, documents=got.documents,
                                      chunks=len(got.chunks))
            out.outcomes.append(outcome)
            out.documents += outcome.documents
            if f.sha256 is not None:
                out.corpus[f.doc_id] = {
                    "sha256": None if r is not None and r.unstable else f.sha256, "bytes": f.bytes,
                    "status": outcome.status, "reason": outcome.reason, "encoding": outcome.encoding,
                    "documents": outcome.documents, "first_chunk": start, "chunks": outcome.chunks}
    finally:
        if store is not None:
            store.close()
    return out


def _sha_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None
