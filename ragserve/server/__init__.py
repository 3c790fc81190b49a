"""``ragserve serve``: the HTTP service over one ``RAG`` engine.

- ``app.py``: the FastAPI app — native API (``/v1/query``, ``/v1/retrieve``, ``/v1/stats``),
  operations (``/health``, ``/ready``, ``/metrics``) and the page at ``/``;
- ``openai_api.py``: ``/v1/chat/completions`` and ``/v1/models`` for standard clients;
- ``mcp_tools.py``: the MCP tools ``retrieve`` and ``answer`` (for ``/mcp`` and stdio);
  ``mcp_http.py``: ``/mcp``, Streamable HTTP, with the API keys;
- ``schemas.py``: request bodies; ``sse.py``: Server-Sent Events framing;
- ``httperrors.py``: ragserve's error tree mapped to HTTP statuses and JSON bodies;
- ``auth.py``: API keys → tenant namespaces; ``prometheus.py``: the Prometheus exporter
  (a request observer); ``middleware.py``: request ids, body limits, draining;
- ``limits.py``: what one client and all of them may hold (header size and count,
  header / body / keep-alive / send timeouts, a connection cap with room for probes);
- ``run.py``: uvicorn with those limits and a SIGTERM drain.

**Usage:** ``ragserve serve indexes/docs --port 8000``, or from Python:
``serve_index("indexes/docs", RAGConfig.load())``.
"""

from ragserve.server.app import create_app
from ragserve.server.run import serve_index

__all__ = ["create_app", "serve_index"]
