"""Test support that plug-in authors and ragserve's own tests share: fakes of the heavy
stages (an embedder, a generator, a tokenizer) and contract suites that every
implementation of a stage interface runs (see ``fakes.py`` and ``contracts.py``); real
servers for tests (``http.py``: uvicorn on loopback, ``redis.py``, ``fake_openai.py``);
``embedders.py``, the real embedder computing each identical call once (for integration
tests that build the same corpus again, not for tests of the model); and ``waits.py``, how
a test waits for what happens elsewhere (poll the condition with a generous deadline,
never sleep and assume).

Fakes are for fast unit tests of logic; every real component also has an integration test.
"""
