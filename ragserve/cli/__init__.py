"""The ``ragserve`` command line: a thin layer over the Python API.

- ``app.py``: the Typer app, the consoles, the config option and the error handling;
- ``main.py``: index and query commands (``build-index``, ``query``, ``eval``, ...);
- ``serving.py``: ``serve``, ``batch`` and ``warm``;
- ``mcp.py``: ``mcp`` (the MCP tools over stdio, for local assistants);
- ``semantic.py``: ``calibrate-semantic``;
- ``console.py``: how results, stats and progress are printed;
- ``quiet.py``: a script's own lines on the terminal, the libraries' and children's output in a log.

Each command imports what it needs inside its body, so ``ragserve --help`` starts fast.
"""

import sys

import ragserve.cli.semantic  # noqa: F401 - registers `calibrate-semantic`
from ragserve.cli.main import app
from ragserve.generators.lifeline import exit_fast

__all__ = ["app", "run"]


def run() -> None:
    """The ``ragserve`` command: the app, then ``exit_fast`` with its status. A command has
    closed what it opened (its ``RAG``, server, Ray connection) by the time it returns, so
    the interpreter's teardown of torch and vLLM (about 2 s) would only delay the exit. The
    status is what ``sys.exit`` would give: an int as it is, None 0, anything else printed
    to stderr and 1."""
    try:
        app()
        code: object = 0
    except SystemExit as e:
        code = e.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    exit_fast(code)
