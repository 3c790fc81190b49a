"""The ``ragserve`` command line: a thin layer over the Python API.

- ``app.py``: the Typer app, the consoles, the config option and the error handling;
- ``main.py``: index and query commands (``build-index``, ``query``, ``eval``, ...);
- ``serving.py``: ``serve``, ``batch`` and ``warm``;
- ``mcp.py``: ``mcp`` (the MCP tools over stdio, for local assistants);
- ``console.py``: how results, stats and progress are printed;
- ``quiet.py``: a script's own lines on the terminal, the libraries' and children's output in a log.

Each command imports what it needs inside its body, so ``ragserve --help`` starts fast.
"""

from ragserve.cli.main import app

__all__ = ["app"]
