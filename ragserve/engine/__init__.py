"""The engine: the order of the stages, and what runs them.

- ``pipeline.py``: ``Pipeline``, the one place that knows the order of the stages (the
  miss path, single-flight, the exact tiers, admission), and owns their timers;
- ``served.py``: the served index snapshot (``ServedIndex``, ``Snapshots``) a request holds
  from start to end, and opening an index folder for serving;
- ``flight.py``: single-flight (identical concurrent misses share one run);
- ``admission.py``: bounded in-flight and queued requests, deadlines;
- ``runtime.py``: the engine's own event loop thread, and the bridges to callers' loops;
- ``validation.py``: what a question and a request's options are, decided before any work.

The engine imports no server, Ray, build, eval, jobs or CLI module (``pyproject.toml``'s
import contracts check it). ``ragserve.RAG`` is its public face.
"""
