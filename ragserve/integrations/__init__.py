"""``ragserve.integrations``: ragserve where users' frameworks already are, each an extra.

- ``langchain.py`` (``pip install 'ragserve[langchain]'``): ``RagserveRetriever``, a
  LangChain ``BaseRetriever``, and ``RagserveAnswer``, a ``Runnable`` for answers.
- ``llamaindex.py`` (``pip install 'ragserve[llamaindex]'``): ``RagserveRetriever``, a
  LlamaIndex ``BaseRetriever`` returning ``NodeWithScore``s, and ``RagserveQueryEngine``.
- ``backend.py``: what both ask of their source — an in-process ``RAG``, a ``Client`` or
  an ``AsyncClient`` — with the missing blocking or async half filled in or refused.

Import the module of the framework you use; this package imports neither framework, and
nothing else in ragserve imports it (a contract in ``pyproject.toml``).
"""
