"""``ragserve mcp INDEX``: the MCP tools (``retrieve``, ``answer``) over stdio, for a local
assistant that starts the command itself (Claude Desktop, an IDE). Registered on
``cli_app.app``; ``cli/main.py`` imports this module.

Stdout is the protocol's: nothing but JSON-RPC may reach it. The SDK's ``stdio_server``
keeps the real fd 1 for the protocol on a private descriptor and points fd 1 at stderr
(and fd 0 at the null device) while it serves. The engine is opened after that, in the
server's lifespan, so what it and its child processes (vLLM's engine core) print, from
Python or C, lands on stderr, which assistants show as the server's log.

With ``--lazy`` the generation engine is not started with the server but by the first
``answer`` that misses the cache (``RAG.from_index(start_engine=False)``): ``retrieve``
needs only the index and the embedding model. While it starts (~30 s for vLLM on 2 CPU
cores) the engine loop is busy, so calls made beside that first ``answer`` can wait with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ragserve.cli.app import ConfigOpt, app, console, fails_cleanly, load_config
from ragserve.errors import RagserveError


@app.command("mcp")
@fails_cleanly
def mcp_cmd(
    index: Annotated[Path, typer.Argument(help="An index folder.")],
    namespace: Annotated[Optional[str], typer.Option(
        help="The cache namespace of this assistant's answers (cache.namespace).")] = None,
    redis_url: Annotated[Optional[str], typer.Option(help="As for serve (cache.redis_url).")] = None,
    lazy: Annotated[bool, typer.Option(
        "--lazy", help="Start the generation engine on the first `answer` call instead of at launch: the "
                       "assistant connects as soon as the index and the embedding model are open, and one "
                       "that only calls `retrieve` never loads the language model.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Serve INDEX's MCP tools over stdio (Model Context Protocol) for a local assistant:
    `retrieve` (the top-k passages with scores and document ids) and `answer` (an answer
    with its sources). The assistant starts this command; see docs/mcp.md."""
    import logging
    import sys

    import anyio

    from ragserve.engine.validation import check_namespace

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")

    cfg = load_config(config, cache={"redis_url": redis_url, "namespace": namespace})
    if namespace is not None:
        check_namespace(namespace)  # refused here, not on every call
    if not Path(index).is_dir():
        from ragserve.errors import IndexNotFoundError

        raise IndexNotFoundError(Path(index))
    try:
        anyio.run(lambda: serve_stdio(index, cfg, start_engine=not lazy))
    except KeyboardInterrupt:
        pass
    except Exception as e:  # noqa: BLE001 - the SDK's task groups wrap what the lifespan raised
        found = _first_ragserve_error(e)
        if found is None:
            raise
        raise found from None
    console.print("ragserve mcp: stdin closed, stopped", highlight=False)


async def serve_stdio(index: Path, cfg: Any, **open_kwargs: Any) -> None:
    """Open ``index`` and serve its MCP tools on this process's stdin/stdout until stdin
    closes. ``open_kwargs``: as for ``RAG.from_index`` (an embedder or generator;
    ``start_engine=False``: the engine starts on the first miss)."""
    from ragserve._version import __version__
    from ragserve.rag import RAG
    from ragserve.server.mcp_tools import build_mcp

    opened: list[Any] = []

    @contextlib.asynccontextmanager
    async def lifespan(_server: Any) -> AsyncIterator[None]:
        # NOTE: here, not before the server runs: stdio_server has moved fd 1 to stderr by
        # now, so the engine's children inherit stderr as their stdout.
        rag = RAG.from_index(index, cfg, **open_kwargs)
        opened.append(rag)
        try:
            yield
        finally:
            rag.close()

    server = build_mcp(lambda: opened[0], version=__version__, lifespan=lifespan)
    await server.run_stdio_async()


def _first_ragserve_error(e: BaseException) -> RagserveError | None:
    """``e`` or the first ``RagserveError`` in it (an exception group, at any depth)."""
    if isinstance(e, RagserveError):
        return e
    for inner in getattr(e, "exceptions", ()):
        if (found := _first_ragserve_error(inner)) is not None:
            return found
    return None
