"""The exact answer tiers: keys, stored values, L1 in process, L2 in Redis.

- ``keys.py``: question normalisation and the SHA-256 cache key;
- ``entries.py``: ``CachedAnswer`` (what a tier stores, msgspec JSON, no pickle) and a
  tier's counters;
- ``l1.py``: the in-process LRU with TTL and byte bound;
- ``l2.py``: Redis with tight timeouts, a circuit breaker and writes off the request path;
- ``answers.py``: ``AnswerCache``, both tiers behind one lookup, and results to and from
  cached values;
- ``redis_server.py``: the embedded Redis ``ragserve serve`` starts by default.
"""
