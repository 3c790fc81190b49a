"""Seeing a request: per-stage clocks, aggregated stage statistics, and observers.

- ``timing.py``: ``StageClock`` (one request's stage timings, the ``Timings`` in every
  result), ``StageStats`` (windowed percentiles per stage), ``Gauges``;
- ``observers.py``: ``RequestObserver``, told of every finished or failed request, and
  ``Observers``, the list a ``RAG`` keeps (``rag.observers.add(...)``). The Prometheus
  exporter, the Ray metrics and the profiler subscribe here.

A base wing: the stages below the engine (retrieval, the cache) time themselves with it,
so it imports only ``types`` and ``errors``.
"""
