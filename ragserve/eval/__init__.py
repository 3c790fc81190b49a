"""Evaluation: data sets, scores, and the retrieval and answer reports.

- ``datasets.py``: SQuAD/XQuAD-style and BEIR-style loaders;
- ``scoring.py``: retrieval metrics (hit@k, recall, MRR, nDCG), answer scores (EM, F1,
  contains-gold) and the one ``percentile`` rule the benchmarks use;
- ``answers.py``: answer quality over a question sample;
- ``evaluate.py``: ``evaluate`` and ``ragserve eval``.
"""
