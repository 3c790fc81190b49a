"""``ragserve.client``: a ``ragserve serve`` server from another process, with the verbs
and types of ``RAG`` (``QueryResult``, ``Source``, the stream events, the error tree), so
code moves between in-process and remote by changing the line that makes it.

- ``client.py``: ``Client`` (blocking); ``async_client.py``: ``AsyncClient``.
- ``calls.py``: the request of each verb, responses back into types, attempts.
- ``retries.py``: ``Retries`` (what is tried again, how long it waits, the bound).
- ``failures.py``: HTTP errors back into ``ragserve.errors`` classes.
- ``events.py``: the SSE stream back into ``SourcesEvent`` / ``TokenEvent`` / ``DoneEvent``.

It imports types, errors and config only: never the engine or the server (a contract in
``pyproject.toml``). httpx is imported when a client is made, not with the package.
"""

from ragserve.client.async_client import AsyncClient
from ragserve.client.client import Client
from ragserve.client.retries import Retries

__all__ = ["AsyncClient", "Client", "Retries"]
