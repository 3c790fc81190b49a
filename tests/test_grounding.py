"""The extractive baseline and groundedness of ``ragserve eval --answers`` (eval/grounding.py)."""

from types import SimpleNamespace

from ragserve.eval.answers import score
from ragserve.eval.datasets import EvalQuestion
from ragserve.eval.grounding import extractive_window, groundedness
from ragserve.types import Source

SOURCE = ("Gotthold Ephraim Lessing was a German writer and philosopher. Lessing was born in 1729 in Kamenz, "
          "a small town in Saxony, and died in 1781.")


def test_the_window_has_the_answers_length_and_the_most_question_words():
    assert extractive_window("In which town was Lessing born?", SOURCE, 5) == "and philosopher. Lessing was born"
    # three of its words (lessing, born, small) fit in nine; "town" would need ten
    assert extractive_window("In which small town was Lessing born?", SOURCE, 9) == \
        "Lessing was born in 1729 in Kamenz, a small"
    # no stemming: "die" is not "died"
    # function words ("in", "was") do not pull the window: only "Saxony" counts here
    assert extractive_window("What is in Saxony?", SOURCE, 2) == "in Saxony,"


def test_a_tie_takes_the_earliest_window_and_short_texts_come_whole():
    assert extractive_window("Unrelated question?", SOURCE, 2) == "Gotthold Ephraim"
    assert extractive_window("Lessing?", "Lessing wrote.", 10) == "Lessing wrote."
    assert extractive_window("Lessing?", SOURCE, 0) == ""
    assert extractive_window("Lessing?", "", 4) == ""


def test_groundedness_finds_numbers_and_names_the_sources_do_not_have():
    g = groundedness("Gerhard Lessing (1755-1806) was a German theologian from Kamenz.", [SOURCE])
    assert g.ungrounded == ("1755", "1806")  # the lucky hallucination; "Gerhard" opens the sentence
    # content words: gerhard lessing 1755 1806 german theologian kamenz (not "was", "a", "from")
    assert g.content_words == 7 and abs(g.grounded_share - 3 / 7) < 1e-9


def test_groundedness_normalises_like_squad_and_reads_every_source():
    g = groundedness("It happened in 1,729 near Kamenz and Dresden.", ["in 1729", "Kamenz", "dresden"])
    # content: happened 1729 near kamenz dresden; "happened" and "near" are in no source
    assert g.ungrounded == () and g.content_words == 5 and g.grounded_share == 3 / 5
    assert groundedness("", [SOURCE]) == groundedness("the and of", [])  # no content: nothing to ground
    assert groundedness("", [SOURCE]).grounded_share == 1.0


def test_a_row_scores_the_answer_and_its_baseline_and_a_failure_scores_zero():
    q = EvalQuestion(qid="q1", text="In which town was Lessing born?", answers=("Kamenz",), relevant={})
    result = SimpleNamespace(answer="Kamenz", sources=[Source("a.txt", 0, 0.9, SOURCE)], finish_reason="stop")
    row = score(q, result)
    assert (row["contains"], row["em"], row["f1"]) == (1.0, 1.0, 1.0)
    # one word, the first with a question word in it: the model added the answer
    assert row["baseline"] == "Lessing" and (row["baseline_contains"], row["baseline_f1"]) == (0.0, 0.0)
    assert row["grounded"] == 1.0 and row["ungrounded"] == [] and not row["cut"]
    long = score(q, SimpleNamespace(answer="He was born in 1729 in Kamenz in 1755.", finish_reason="length",
                                    sources=[Source("a.txt", 0, 0.9, SOURCE)]))
    assert long["baseline"] == "was a German writer and philosopher. Lessing was born" and long["cut"]
    assert long["ungrounded"] == ["1755"] and long["grounded"] == 3 / 4  # born 1729 kamenz, not 1755
    failed = score(q, RuntimeError("engine died"))
    assert failed["baseline"] == "" and failed["grounded"] == 0.0 and failed["baseline_contains"] == 0.0
