"""Test support that plug-in authors and ragserve's own tests share: fakes of the heavy
stages (an embedder, a generator, a tokenizer) and contract suites that every
implementation of a stage interface runs (see ``fakes.py`` and ``contracts.py``).

Fakes are for fast unit tests of logic; every real component also has an integration test.
"""
