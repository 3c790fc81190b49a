"""The headline benchmark's logic without an engine: the streams it draws (one Zipf law for
yesterday and today, open-loop arrivals) and the fidelity checks it reports (cached answers
against the generation that stored them, regenerations after an answer completed)."""

from collections import Counter

import pytest

from ragserve.eval.paraphrases import rewrites
from ragserve.profiling.workload import (
    paraphrase_repeats,
    poisson_arrivals,
    repeat_ceiling,
    zipf_days,
    zipf_stream,
)

from .conftest import load_benchmark


def load_report():
    return load_benchmark("headline_report")


def test_days_share_one_popularity_law_but_not_their_draws():
    items = list(range(200))
    yesterday, today = zipf_days(items, 3000, s=1.1, seed=3)
    assert yesterday == zipf_stream(items, 3000, s=1.1, seed=3)
    assert yesterday != today
    top_y = [q for q, _ in Counter(yesterday).most_common(5)]
    top_t = [q for q, _ in Counter(today).most_common(5)]
    assert top_y[0] == top_t[0] and len(set(top_y) & set(top_t)) >= 3  # the same popular questions
    assert zipf_days(items, 50, seed=3) == zipf_days(items, 50, seed=3)  # reproducible
    with pytest.raises(ValueError):
        zipf_days([], 5)


def test_poisson_arrivals_keep_the_rate_and_start_at_zero():
    times = poisson_arrivals(4000, rate=20.0, seed=1)
    assert times[0] == 0.0 and times == sorted(times)
    assert 4000 / times[-1] == pytest.approx(20.0, rel=0.1)
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(3, 0)


def test_paraphrased_repeats_reword_about_p_of_the_repeats_and_never_a_first_ask():
    questions = {i: f"What is the name of thing {i}?" for i in range(40)}
    stream = zipf_stream(list(questions), 3000, s=1.1, seed=1)
    asked = paraphrase_repeats(stream, 0.3, questions.__getitem__, seed=1)
    assert [i for i, _ in asked] == stream  # the draws are the stream's, in order
    seen, repeats, reworded = set(), 0, 0
    for i, text in asked:
        if i not in seen:
            assert text == questions[i]  # a first ask is the question itself
        else:
            repeats += 1
            reworded += text != questions[i]
            assert text == questions[i] or text in rewrites(questions[i])  # a rewrite keeps the meaning
        seen.add(i)
    assert reworded / repeats == pytest.approx(0.3, abs=0.03)
    assert paraphrase_repeats(stream, 0.3, questions.__getitem__, seed=1) == asked  # reproducible
    unchanged = paraphrase_repeats(stream, 0.0, questions.__getitem__)
    assert [t for _, t in unchanged] == [questions[i] for i in stream]
    with pytest.raises(ValueError, match="p must be"):
        paraphrase_repeats(stream, 1.5, questions.__getitem__)


def test_a_repeat_is_told_by_its_key_and_the_ceiling_counts_meanings():
    # Two draws of one question as different objects (qid, text, draw): one meaning, by its key.
    stream = [("a", "Who built it?", 0), ("a", "Who built it?", 1), ("b", "When was it built?", 2)]
    asked = paraphrase_repeats(stream, 1.0, lambda q: q[1], key=lambda q: q[0])
    assert asked[0][1] == "Who built it?" and asked[1][1] in rewrites("Who built it?")
    assert asked[2][1] == "When was it built?"
    assert repeat_ceiling([q[0] for q in stream]) == pytest.approx(1 / 3)
    assert repeat_ceiling(["a", "a", "a", "a"]) == 0.75 and repeat_ceiling([]) != repeat_ceiling([])


def _req(hr, i, key, sent, done, tier, answer):
    return hr.Req(i, f"q-{key}", key, sent, done, tier, answer)


def test_fidelity_compares_hits_with_the_generation_that_stored_them():
    hr = load_report()
    reqs = [
        _req(hr, 0, "a", 0.0, 5.0, "miss", "Paris"),
        _req(hr, 1, "a", 1.0, 5.0, "shared", "Paris"),   # joined the running generation
        _req(hr, 2, "a", 6.0, 6.1, "l1", "Paris"),
        _req(hr, 3, "b", 0.0, 4.0, "miss", "1066"),
        _req(hr, 4, "b", 4.5, 4.6, "l2", "1067"),        # not what was stored
        _req(hr, 5, "b", 5.0, 9.0, "miss", "1066"),      # generated again after an answer came back
        _req(hr, 6, "c", 0.0, 1.0, "l1", "x"),           # stored before the run
    ]
    f = hr.fidelity(reqs, stored={"c": "x"})
    assert (f["served_from_cache"], f["compared"], f["identical"]) == (4, 4, 3)
    assert f["regenerated_after_answer"] == 1 and f["regenerated_questions"] == 1
    assert f["no_reference"] == 0
    # a hit whose generation is not in the run and was not given is counted, not compared
    assert hr.fidelity([_req(hr, 0, "z", 0, 1, "l2", "y")])["no_reference"] == 1


def test_a_miss_sent_before_the_first_answer_is_not_a_regeneration():
    hr = load_report()
    reqs = [_req(hr, 0, "a", 0.0, 5.0, "miss", "A"), _req(hr, 1, "a", 4.9, 9.0, "miss", "A")]
    assert hr.fidelity(reqs)["regenerated_after_answer"] == 0


def test_summary_and_quality_of_cached_against_fresh_answers():
    hr = load_report()
    cached = [_req(hr, 0, "a", 0.0, 2.0, "miss", "It is Paris."), _req(hr, 1, "a", 2.0, 2.001, "l1", "It is Paris."),
              _req(hr, 2, "b", 0.0, 1.0, "error", "")]
    cached[2].error = "RuntimeError: HTTP 503"
    fresh = [_req(hr, 0, "a", 0, 1, "miss", "Paris"), _req(hr, 1, "a", 1, 2, "miss", "Lyon"),
             _req(hr, 2, "b", 2, 3, "miss", "no")]
    row = hr.summarize("x", cached, wall_s=2.0, generations=1.0, cpu_s=3.0)
    assert row["requests"] == 3 and row["errors"] == 1 and row["requests_per_s"] == 1.0
    assert row["tiers"] == {"miss": 1, "l1": 1, "error": 1} and row["hit_rate"] == pytest.approx(1 / 3)
    assert row["distinct_questions"] == 2 and row["generations_per_distinct"] == 0.5
    assert row["cpu_s_per_request"] == 1.0
    q = hr.quality(cached, fresh, {"q-a": ("Paris",), "q-b": ("yes",)})
    assert q["pairs"] == 1 and q["cached_contains_gold"] == 1.0 and q["fresh_contains_gold"] == 0.0
    lines = hr.table([row])
    assert len(lines) == 3 and "| x |" in lines[2]


def test_a_cache_without_single_flight_may_serve_any_of_its_generations_but_not_a_later_one():
    hr = load_report()
    reqs = [_req(hr, 0, "a", 0.0, 3.0, "miss", "A1"), _req(hr, 1, "a", 0.5, 4.0, "miss", "A2"),  # both at once
            _req(hr, 2, "a", 5.0, 5.1, "cache", "A2"),   # the last write won: still a stored generation
            _req(hr, 3, "a", 6.0, 9.0, "miss", "A3"),    # generated again after an answer existed
            _req(hr, 4, "a", 7.0, 7.1, "cache", "A3")]   # A3 was not done when this was sent
    f = hr.fidelity(reqs)
    assert (f["compared"], f["identical"]) == (2, 1)
    assert f["regenerated_after_answer"] == 1 and f["inconsistent_questions"] == 1


def load_driver():
    return load_benchmark("bench_headline")


class _Sleepy:
    """A system that answers after 20 ms, and fails one question."""

    def __init__(self):
        self.in_flight = self.peak = 0

    async def ask(self, question):
        import asyncio

        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(0.02)
            if question == "bad":
                raise RuntimeError("HTTP 503: overloaded")
            return question.upper(), "miss"
        finally:
            self.in_flight -= 1


def _stream(n):
    from ragserve.eval.datasets import EvalQuestion

    return [EvalQuestion(f"q{i}", "bad" if i == 3 else f"question {i % 5}", {}) for i in range(n)]


async def test_closed_loop_keeps_c_in_flight_and_records_a_failure_without_stopping():
    bh = load_driver()
    system, args = _Sleepy(), bh.parse_args(["--n", "30", "--concurrency", "4"])
    reqs, wall = await bh.drive(system, _stream(30), args)
    assert system.peak == 4 and len(reqs) == 30
    assert [r.i for r in reqs if r.error] == [3] and "503" in reqs[3].error and reqs[3].tier == "error"
    assert reqs[0].answer == "QUESTION 0" and reqs[0].key == "question 0"
    assert all(r.done_s >= r.sent_s for r in reqs)


async def test_open_loop_sends_on_schedule_whatever_the_answers_take():
    bh = load_driver()
    system = _Sleepy()
    args = bh.parse_args(["--n", "40", "--rate", "400", "--max-open", "3"])
    reqs, wall = await bh.drive(system, _stream(40), args)
    assert system.peak <= 3 and len(reqs) == 40 and sum(r.error is not None for r in reqs) == 1
    # 40 arrivals at 400/s take ~0.1 s; at most 3 open at 20 ms each bounds the rest
    assert wall < 2.0
    # a request that waited for a free slot counts that wait in its latency
    assert max(r.latency_s for r in reqs if r.error is None) > 0.03


# -- paraphrase mode (--paraphrase): its stream, its report and the order of its runs ------


def _questions(n):
    from ragserve.eval.datasets import EvalQuestion

    return [EvalQuestion(f"q{i}", f"What is the name of thing {i}?", {}, (f"thing {i}",)) for i in range(n)]


def test_paraphrase_mode_needs_a_threshold_and_one_stream():
    bh = load_driver()
    args = bh.parse_args(["--paraphrase", "0.3,0.5", "--semantic-threshold", "0.8", "--systems", "ragserve"])
    assert args.paraphrase == [0.3, 0.5] and args.semantic_threshold == 0.8
    assert bh.parse_args([]).paraphrase is None  # the other modes are untouched
    for bad in (["--paraphrase", "0.3", "--systems", "ragserve"],  # no threshold
                ["--paraphrase", "1.3", "--semantic-threshold", "0.8"],
                ["--paraphrase", "0.3", "--semantic-threshold", "0.8", "--days"],
                ["--paraphrase", "0.3", "--semantic-threshold", "0.8", "--s", "1.0,1.2"]):
        with pytest.raises(SystemExit):
            bh.parse_args(bad)


def test_the_paraphrase_streams_keep_each_questions_id_and_reword_only_repeats():
    hp = load_benchmark("headline_paraphrase")
    questions = _questions(30)
    by_text = {q.text: q for q in questions}
    args = load_driver().parse_args(["--n", "500", "--paraphrase", "0,0.5", "--semantic-threshold", "0.8"])
    streams = hp.streams(questions, args, 1.1)
    base = zipf_stream(questions, 500, s=1.1, seed=0)
    assert [q.text for q in streams[0.0]] == [q.text for q in base]
    assert [q.qid for q in streams[0.5]] == [q.qid for q in base]  # the same meanings, in order
    reworded = [(q, b) for q, b in zip(streams[0.5], base, strict=True) if q.text != b.text]
    assert 0.3 * 500 * 0.5 < len(reworded) and all(q.text in rewrites(b.text) for q, b in reworded)
    assert all(q.answers == by_text[b.text].answers for q, b in reworded)  # golds follow the meaning


class _Tiered:
    """A cache over fakes: exact repeats hit l1; with ``semantic``, a rewording of a question
    asked before hits ``semantic`` with that question as its match."""

    def __init__(self, semantic):
        self.semantic, self.stored = semantic, {}

    async def ask(self, text):
        from ragserve.cache.keys import normalize_question

        key = normalize_question(text)
        if key in self.stored:
            return self.stored[key], "l1", None
        if self.semantic:
            for stored_key, answer in self.stored.items():
                if key in {normalize_question(r) for r in rewrites(stored_key)}:  # the fake's "same meaning"
                    return answer, "semantic", stored_key
        self.stored[key] = f"answer to {key}"
        return self.stored[key], "miss", None


async def test_drive_records_a_semantic_hit_and_fidelity_checks_it_against_its_match():
    bh, hr = load_driver(), load_report()
    from ragserve.eval.datasets import EvalQuestion

    stream = [EvalQuestion("a", "Who built it?", {}), EvalQuestion("a", "Can you tell me who built it?", {}),
              EvalQuestion("a", "Who built it?", {})]
    args = bh.parse_args(["--concurrency", "1"])
    reqs, _ = await bh.drive(_Tiered(semantic=True), stream, args)
    assert [r.tier for r in reqs] == ["miss", "semantic", "l1"]
    assert reqs[1].match == "Who built it?" and reqs[0].match is None
    f = hr.fidelity(reqs)
    assert (f["served_from_cache"], f["compared"], f["identical"]) == (2, 2, 2)
    reqs[1].answer = "another answer"  # a semantic hit that is not its match's stored answer
    assert hr.fidelity(reqs)["identical"] == 1
    row = hr.summarize("x", reqs, wall_s=1.0, generations=1.0, cpu_s=None)
    assert row["hit_rate"] == pytest.approx(2 / 3) and row["tiers"]["semantic"] == 1


async def test_paraphrase_runs_exact_systems_then_the_semantic_server_and_reports_each():
    hp, hr, bh = load_benchmark("headline_paraphrase"), load_report(), load_driver()
    import types

    questions = _questions(20)
    args = bh.parse_args(["--n", "200", "--concurrency", "4", "--paraphrase", "0.5",
                          "--semantic-threshold", "0.8", "--systems", "ragserve"])
    calls = []

    class FakeSystem(_Tiered):
        async def generations(self):
            return float(len(self.stored))

    class FakeBench:
        systems = {"ragserve": FakeSystem(semantic=False)}
        dataset = types.SimpleNamespace(questions=questions)
        golds = {q.qid: q.answers for q in questions}
        server = client = None
        admin_key = "k"

        def __init__(self):
            self.args = args

        async def restart_server(self, env, log_name):
            calls.append(("restart", env["RAGSERVE_SEMANTIC_THRESHOLD"]))

        async def run(self, name, stream, label):
            calls.append(("run", label))
            system = self.systems[name]
            if name == hp.SEMANTIC:  # the new server's system: a cache with the semantic tier
                system = self.systems[name] = FakeSystem(semantic=True)
            reqs, wall = await bh.drive(system, stream, args)
            return hr.summarize(label, reqs, wall, await system.generations(), None), reqs

    rows, lines, requests = await hp.run_paraphrase(FakeBench(), 1.1, bh.quality_lines)
    assert calls == [("run", "ragserve p=0.5"), ("restart", "0.8"), ("run", "ragserve-semantic p=0.5")]
    exact, semantic = rows
    assert (exact["name"], semantic["name"]) == ("ragserve", hp.SEMANTIC) and set(requests) == {
        "ragserve p=0.5", "ragserve-semantic p=0.5"}
    meanings = len({q.qid for q in zipf_stream(questions, 200, s=1.1, seed=0)})
    assert exact["meanings"] == semantic["meanings"] == meanings
    assert semantic["ceiling"] == pytest.approx(1 - meanings / 200)
    # exact-only hits only verbatim repeats; the semantic tier takes the rewordings too, up to the ceiling
    assert "semantic" not in exact["tiers"] and semantic["tiers"]["semantic"] > 0
    assert exact["hit_rate"] < semantic["hit_rate"] <= semantic["ceiling"] + 1e-9
    assert semantic["generations"] < exact["generations"]
    table = [ln for ln in lines if ln.startswith("| 0.5 |")]
    assert len(table) == 2 and f"| {hp.SEMANTIC} | 200 | {meanings} |" in table[1]
    shares = table[1].split(" | ")
    assert shares[5] == f"{semantic['hit_rate']:.1%}" and shares[7] == "0.0%"  # hit rate; no l2
    assert shares[8] == f"{semantic['tiers']['semantic'] / 200:.1%}"
    assert shares[10] == f"{semantic['hit_rate'] / semantic['ceiling']:.1%}"
    gain = next(ln for ln in lines if ln.startswith("- p=0.5"))
    assert f"{100 * (semantic['hit_rate'] - exact['hit_rate']):+.1f} points" in gain
    assert f"leaves {100 * (semantic['ceiling'] - exact['hit_rate']):.1f} points" in gain
