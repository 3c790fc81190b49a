"""Evaluation data sets: SQuAD-style JSON and BEIR-style folders, read into one shape.

- **SQuAD** (also XQuAD): a ``.json`` file ``{"data": [{"title", "paragraphs": [{"context",
  "qas": [{"id", "question", "answers": [{"text"}]}]}]}]}``. Every paragraph is a document
  (``Title#i``; a paragraph text that occurs twice is one document); a question's one
  relevant document is its own paragraph, and its gold answers are kept for ``--answers``.
  ``squad_paragraphs`` gives the paragraphs as the file lays them out (title, position).
- **Questions** (``kind="questions"``): a ``.json`` file ``{"questions": [{"question",
  "answers": [...], "id", "relevant": [doc ids] or {doc id: grade}}], "name"}``, questions
  without documents, asked of an existing index (the body of ``POST /admin/eval`` is one;
  its other keys are the endpoint's and are not read here). ``answers``, ``id`` and
  ``relevant`` are optional; a question without ``relevant`` counts in no retrieval metric.
- **BEIR**: a folder with ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl``
  (``_id``, ``text``) and ``qrels/<split>.tsv`` (``query-id``, ``corpus-id``, ``score``,
  with a header line). Questions are the queries with at least one judgment > 0; there are
  no gold answers.

**Usage:**

    ds = load_dataset("../shared/data/xquad-en/xquad.en.json")
    len(ds.documents), len(ds.questions), ds.questions[0].relevant
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from ragserve.build.ingest import Document
from ragserve.errors import DatasetError


@dataclass(frozen=True)
class EvalQuestion:
    qid: str
    text: str
    relevant: dict[str, int]
    """Document id → graded relevance (> 0)."""
    answers: tuple[str, ...] = ()
    """Gold answer texts (SQuAD); empty for BEIR."""


@dataclass(frozen=True)
class EvalDataset:
    name: str
    kind: Literal["squad", "beir", "questions"]
    path: Path
    documents: list[Document]
    questions: list[EvalQuestion]
    notes: list[str] = field(default_factory=list)
    """What was left out while reading, and why (e.g. judgments naming unknown documents)."""

    @property
    def has_answers(self) -> bool:
        return any(q.answers for q in self.questions)

    def digest(self) -> str:
        """SHA-256 over the documents (ids, texts, metadata): what an index is built from."""
        h = hashlib.sha256()
        for d in self.documents:
            h.update(orjson.dumps([d.doc_id, d.text, d.metadata], option=orjson.OPT_SORT_KEYS))
        return h.hexdigest()


def load_dataset(path: Path | str, split: str = "test") -> EvalDataset:
    """Read a SQuAD ``.json`` file or a BEIR folder (``split`` picks ``qrels/<split>.tsv``).

    **Usage:** ``load_dataset("data/scifact", split="test")``
    """
    path = Path(path)
    if path.is_file():
        data = _json(path, path.read_bytes())
        if isinstance(data, dict) and "questions" in data and "data" not in data:
            return load_questions(path, data)
        return load_squad(path)
    if path.is_dir() and (path / "corpus.jsonl").is_file():
        return load_beir(path, split)
    if path.is_dir():
        raise DatasetError(path, "a folder without corpus.jsonl: a BEIR data set needs corpus.jsonl, "
                                 "queries.jsonl and qrels/<split>.tsv")
    raise DatasetError(path, "no such file or folder (expected a SQuAD .json file or a BEIR folder)")


@dataclass(frozen=True)
class SquadParagraph:
    """One paragraph of a SQuAD-style file as the file has it (``load_squad`` then makes one
    document of paragraphs with the same text): its article (index and title), its position
    among the article's paragraphs, its text, and its questions as (id or None, question,
    gold answers)."""

    article: int
    title: str
    position: int
    context: str
    qas: tuple[tuple[str | None, str, tuple[str, ...]], ...]


def squad_paragraphs(path: Path | str) -> list[SquadParagraph]:
    """Every paragraph of a SQuAD ``.json`` file, in file order; a missing title is
    ``article<i>``. For what needs the file's own layout (a corpus of one file per paragraph).

    **Usage:** ``[f"{p.title}_{p.position}.txt" for p in squad_paragraphs("xquad.en.json")]``
    """
    path = Path(path)
    data = _json(path, path.read_bytes())
    articles = data.get("data") if isinstance(data, dict) else None
    if not isinstance(articles, list):
        raise DatasetError(path, 'not SQuAD-style: expected {"data": [articles]}')
    out = []
    for a, article in enumerate(articles):
        title = str(_get(path, article, "title", f"data[{a}]", default=f"article{a}"))
        for p, para in enumerate(_get(path, article, "paragraphs", f"data[{a}]")):
            where = f"data[{a}].paragraphs[{p}]"
            context = str(_get(path, para, "context", where))
            qas = []
            for q, qa in enumerate(_get(path, para, "qas", where)):
                text = str(_get(path, qa, "question", f"{where}.qas[{q}]"))
                answers = tuple(str(x["text"]) for x in qa.get("answers", []) if isinstance(x, dict) and "text" in x)
                qas.append((str(qa["id"]) if "id" in qa else None, text, answers))
            out.append(SquadParagraph(a, title, p, context, tuple(qas)))
    return out


def load_squad(path: Path) -> EvalDataset:
    docs: list[Document] = []
    questions: list[EvalQuestion] = []
    by_text: dict[str, str] = {}
    used: set[str] = set()
    for para in squad_paragraphs(path):
        doc_id = by_text.get(para.context)
        if doc_id is None:
            doc_id = f"{para.title}#{para.position}"
            if doc_id in used:  # two articles with one title: keep the ids apart
                doc_id = f"{para.title}#{para.position}@{para.article}"
            by_text[para.context] = doc_id
            used.add(doc_id)
            docs.append(Document(doc_id, para.context, {"title": para.title}))
        for q, (qid, text, answers) in enumerate(para.qas):
            questions.append(EvalQuestion(qid if qid is not None else f"{doc_id}/{q}", text, {doc_id: 1}, answers))
    if not docs or not questions:
        raise DatasetError(path, "no paragraphs with questions")
    return EvalDataset(path.stem, "squad", path, docs, questions)


def load_questions(path: Path, data: Any = None) -> EvalDataset:
    """A questions file (see the module docstring): no documents; the name is its ``name``
    or the file's stem."""
    if data is None:
        data = _json(path, path.read_bytes())
    items = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise DatasetError(path, 'not a questions file: expected {"questions": [{"question": ...}, ...]}')
    try:
        questions = parse_questions(items)
    except ValueError as e:
        raise DatasetError(path, str(e)) from None
    return EvalDataset(str(data.get("name") or path.stem), "questions", path, [], questions)


def parse_questions(items: list[Any]) -> list[EvalQuestion]:
    """Questions as JSON values (a questions file's, or ``POST /admin/eval``'s validated
    body) into ``EvalQuestion``s: the id is ``id`` or the position; ``relevant`` a list of
    document ids (grade 1 each) or ids with grades. Raises ``ValueError`` naming the item."""
    out = []
    for i, item in enumerate(items):
        where = f"questions[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise ValueError(f"{where}: expected an object with a string 'question'")
        answers = item.get("answers") or []
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}.answers: expected a list of strings")
        relevant = item.get("relevant") or {}
        if isinstance(relevant, list) and all(isinstance(d, str) for d in relevant):
            relevant = dict.fromkeys(relevant, 1)
        elif not (isinstance(relevant, dict) and all(isinstance(d, str) and isinstance(g, int)
                                                     and not isinstance(g, bool) for d, g in relevant.items())):
            raise ValueError(f"{where}.relevant: expected a list of document ids or {{document id: grade}}")
        qid = item.get("id")
        out.append(EvalQuestion(str(qid) if qid is not None else str(i), item["question"], dict(relevant),
                                tuple(answers)))
    return out


def load_beir(folder: Path, split: str = "test") -> EvalDataset:
    docs = []
    for n, row in _jsonl(folder / "corpus.jsonl", ("_id",)):
        title, text = str(row.get("title") or ""), str(row.get("text") or "")
        if not (title or text).strip():
            raise DatasetError(folder / "corpus.jsonl", f"line {n}: document {row['_id']!r} has no text")
        docs.append(Document(str(row["_id"]), f"{title}\n{text}" if title else text, {"title": title}))
    queries = {str(row["_id"]): str(row["text"]) for _, row in _jsonl(folder / "queries.jsonl", ("_id", "text"))}
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        raise DatasetError(qrels_path, f"missing: the judgments of split {split!r}")
    known = {d.doc_id for d in docs}
    relevant: dict[str, dict[str, int]] = {}
    unknown = 0
    for n, line in enumerate(qrels_path.read_text("utf-8").splitlines(), start=1):
        parts = line.split("\t")
        if not line.strip() or (n == 1 and parts[0] == "query-id"):
            continue
        if len(parts) != 3:
            raise DatasetError(qrels_path, f"line {n}: expected query-id<TAB>corpus-id<TAB>score, got {line!r}")
        try:
            score = int(float(parts[2]))
        except ValueError:
            raise DatasetError(qrels_path, f"line {n}: score {parts[2]!r} is not a number") from None
        if parts[1] not in known or parts[0] not in queries:
            unknown += 1
        elif score > 0:
            relevant.setdefault(parts[0], {})[parts[1]] = score
    questions = [EvalQuestion(qid, queries[qid], rel) for qid, rel in relevant.items()]
    if not questions:
        raise DatasetError(qrels_path, "no query has a relevant document in the corpus")
    notes = [f"{unknown} judgments name a query or document that is not in the data set; left out"] if unknown else []
    return EvalDataset(folder.name, "beir", folder, docs, questions, notes)


def _json(path: Path, data: bytes) -> Any:
    """Parse a whole JSON file; a syntax error names the file."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise DatasetError(path, f"not valid JSON: {e}") from None


def _jsonl(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise DatasetError(path, "missing")
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise DatasetError(path, f"line {n}: not valid JSON: {e}") from None
            missing = [k for k in required if not isinstance(row, dict) or k not in row]
            if missing:
                raise DatasetError(path, f"line {n}: missing {', '.join(map(repr, missing))}")
            yield n, row


def _get(path: Path, obj: Any, key: str, where: str, default: Any = ...) -> Any:
    if isinstance(obj, dict) and key in obj:
        return obj[key]
    if default is not ...:
        return default
    raise DatasetError(path, f"{where}: missing {key!r}")
