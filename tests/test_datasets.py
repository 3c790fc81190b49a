import json

import pytest

from ragserve.errors import DatasetError
from ragserve.eval.datasets import load_dataset, squad_paragraphs

from .conftest import write_beir_from_squad, write_squad_slice


def test_squad_slice(tmp_path):
    ds = load_dataset(write_squad_slice(tmp_path / "xquad8.json", 8))
    assert ds.kind == "squad" and ds.name == "xquad8" and ds.has_answers
    assert len(ds.documents) == 40 and len(ds.questions) == 225
    q = ds.questions[0]
    assert q.text == "How many points did the Panthers defense surrender?"
    assert q.relevant == {"Super_Bowl_50#0": 1} and q.answers == ("308",)
    assert ds.documents[0].doc_id == "Super_Bowl_50#0"
    assert len(ds.digest()) == 64 and ds.digest() == load_dataset(tmp_path / "xquad8.json").digest()


def test_squad_duplicate_paragraph_is_one_document(tmp_path):
    para = {"context": "Basel lies on the Rhine.", "qas": [{"id": "q1", "question": "Where is Basel?",
                                                             "answers": [{"text": "on the Rhine"}]}]}
    data = {"data": [{"title": "A", "paragraphs": [para]}, {"title": "B", "paragraphs": [para]}]}
    (tmp_path / "d.json").write_text(json.dumps(data))
    ds = load_dataset(tmp_path / "d.json")
    assert [d.doc_id for d in ds.documents] == ["A#0"]
    assert [q.relevant for q in ds.questions] == [{"A#0": 1}, {"A#0": 1}]


def test_squad_paragraphs_keep_the_files_layout(tmp_path):
    para = {"context": "Basel lies on the Rhine.", "qas": [{"id": "q1", "question": "Where is Basel?",
                                                             "answers": [{"text": "on the Rhine"}, "junk"]}]}
    data = {"data": [{"title": "A", "paragraphs": [para, {"context": "Bern.", "qas": [{"question": "Capital?"}]}]},
                     {"paragraphs": [para]}]}
    (tmp_path / "d.json").write_text(json.dumps(data))
    paras = squad_paragraphs(tmp_path / "d.json")
    assert [(p.article, p.title, p.position, p.context) for p in paras] == [
        (0, "A", 0, "Basel lies on the Rhine."), (0, "A", 1, "Bern."), (1, "article1", 0, "Basel lies on the Rhine.")]
    assert paras[0].qas == (("q1", "Where is Basel?", ("on the Rhine",)),) and paras[1].qas == ((None, "Capital?", ()),)
    # load_squad's view of the same file: one document per text, ids from the first paragraph
    ds = load_dataset(tmp_path / "d.json")
    assert [d.doc_id for d in ds.documents] == ["A#0", "A#1"] and ds.questions[1].qid == "A#1/0"


def test_beir_folder_matches_the_squad_view(tmp_path):
    ds = load_dataset(write_beir_from_squad(tmp_path / "beir8", 8))
    squad = load_dataset(write_squad_slice(tmp_path / "s.json", 8))
    assert ds.kind == "beir" and ds.name == "beir8" and not ds.has_answers
    assert [d.doc_id for d in ds.documents] == [d.doc_id for d in squad.documents]
    assert {q.qid: q.relevant for q in ds.questions} == {q.qid: q.relevant for q in squad.questions}


def test_beir_judgments_on_unknown_documents_are_noted(tmp_path):
    folder = write_beir_from_squad(tmp_path / "b", 1)
    with open(folder / "qrels" / "test.tsv", "a") as f:
        f.write("nope\tSuper_Bowl_50#0\t1\n")
    assert load_dataset(folder).notes == ["1 judgments name a query or document that is not in the data set; left out"]


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda p: (p / "qrels" / "test.tsv").unlink(), r"test.tsv: missing"),
        (lambda p: (p / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n{broken\n'), r"corpus.jsonl: line 2: not valid JSON"),
        (lambda p: (p / "queries.jsonl").write_text('{"text": "no id"}\n'), r"queries.jsonl: line 1: missing '_id'"),
        (lambda p: (p / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1 d1 1\n"), r"line 2: expected"),
        (lambda p: (p / "corpus.jsonl").unlink(), r"without corpus.jsonl"),
    ],
)
def test_broken_beir_names_file_and_line(tmp_path, damage, words):
    folder = write_beir_from_squad(tmp_path / "b", 1)
    damage(folder)
    with pytest.raises(DatasetError, match=words):
        load_dataset(folder)


def test_broken_squad_and_missing_path(tmp_path):
    (tmp_path / "bad.json").write_text('{"data": [{"title": "T", "paragraphs": [{"qas": []}]}]}')
    with pytest.raises(DatasetError, match=r"data\[0\].paragraphs\[0\]: missing 'context'"):
        load_dataset(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match="not SQuAD-style"):
        load_dataset(tmp_path / "list.json")
    with pytest.raises(DatasetError, match="no such file or folder"):
        load_dataset(tmp_path / "nope.json")
