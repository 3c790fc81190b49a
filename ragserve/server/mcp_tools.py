"""ragserve as Model Context Protocol tools, for assistants (Claude Desktop, IDEs, agent
runtimes): ``retrieve`` (the top-k sources with scores, no LLM) and ``answer`` (the answer
with its sources), built with the official ``mcp`` SDK.

Each tool is one call of the same verb ``/v1`` uses (``aretrieve``, ``aquery``): the same
validation, admission, caches, deadline and errors; ``answer`` runs in the caller's tenant
namespace, which the transport decides (``mcp_http.py``: the API key; stdio: the config's).
A refused call (empty question, ``top_k`` out of range, a model not served, overload, a
dead engine) is an MCP tool error, ``is_error`` with a text naming the error type and what
is wrong; it ends that call only, never the session or other calls.

**Usage:** ``server = build_mcp(lambda: rag)``; ``mcp_http.add_mcp_route`` serves it at
``/mcp``, ``ragserve mcp INDEX`` over stdio (``cli/mcp.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any

import orjson
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from ragserve.errors import OverloadedError, RagserveError
from ragserve.server.common import source_json
from ragserve.server.schemas import inline_schema

log = logging.getLogger("ragserve.mcp")

MAX_TOP_K = 100
"""As ``/v1``: ``top_k`` is an int in 1..100 (``engine/validation.check_options``)."""

INSTRUCTIONS = ("ragserve answers questions from one indexed document collection. Call `retrieve` for the "
                "passages most relevant to a question (with scores and document ids) and read them yourself; "
                "call `answer` for a short answer generated from those passages, with its sources.")


class ToolSource(BaseModel):
    """One retrieved chunk."""

    doc_id: str = Field(description="The document the chunk comes from (its path in the corpus).")
    chunk_id: int = Field(description="The chunk's id in the index.")
    score: float = Field(description="Similarity to the question (cosine; higher is closer).")
    text: str = Field(description="The chunk's text.")
    metadata: dict[str, Any] = Field(default_factory=dict)


_MISSING = ("Shards of a sharded index that did not answer the search: the sources are the other shards' "
            "best only, so the result is partial. Empty: whole.")


class Retrieval(BaseModel):
    """What ``retrieve`` returns."""

    sources: list[ToolSource] = Field(description="The top-k chunks, best first.")
    missing_shards: list[str] = Field(default_factory=list, description=_MISSING)


class Answer(BaseModel):
    """What ``answer`` returns."""

    answer: str = Field(description="The generated answer.")
    sources: list[ToolSource] = Field(description="The chunks the answer was generated from, best first.")
    cache_tier: str = Field(description="Where the answer came from: miss (generated now), l1 or l2 "
                                        "(cached).")
    model: str = Field(description="The generation model.")
    request_id: str
    timings_ms: dict[str, float] = Field(description="Milliseconds per stage (embed, search, generate, "
                                                     "total...).")
    missing_shards: list[str] = Field(default_factory=list, description=_MISSING)


Question = Annotated[str, Field(description="The question, in natural language.")]
# NOTE: the bounds are in the schema for the model to read, and checked by the engine (the
# same InvalidParameterError as the Python API), not by pydantic, whose message is longer.
TopK = Annotated[int | None, Field(json_schema_extra={"minimum": 1, "maximum": MAX_TOP_K},
                                   description=f"How many chunks to use, 1..{MAX_TOP_K} (default: the "
                                               "server's).")]
ModelName = Annotated[str | None, Field(description="Which of the server's models answers (GET /v1/models "
                                                    "lists them; default: the server's default).")]
TenantOf = Callable[[Context], "str | None"]
RequestIdOf = Callable[[Context], "str | None"]


def build_mcp(rag_of: Callable[[], Any], *, tenant_of: TenantOf | None = None,
              request_id_of: RequestIdOf | None = None, version: str = "", lifespan: Any = None) -> MCPServer:
    """An ``MCPServer`` with the two tools over the ``RAG`` that ``rag_of()`` returns when a
    call comes (a server opens it in its lifespan). ``tenant_of(ctx)``: the namespace of
    the caller (None: ``cache.namespace``); ``request_id_of(ctx)``: the request id to give
    the engine (None: a new one); ``lifespan``: the SDK's (``ragserve mcp`` opens the
    engine in it)."""
    read_only = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)

    # NOTE: each tool returns its result built once (``tool_result``), under the output
    # schema of its model (``Annotated[CallToolResult, Model]``: the SDK still checks the
    # structured content against it), rather than the model itself, which the SDK would turn
    # into JSON text with indentation and dump again for the structured content, per call.
    async def retrieve(question: Question, ctx: Context,
                       top_k: TopK = None) -> Annotated[CallToolResult, Retrieval]:
        """The passages of the indexed collection most relevant to a question, best first,
        with their similarity scores and document ids. No text is generated."""
        sources = await _call(ctx, "retrieve", rag_of().aretrieve(question, top_k))
        return tool_result({"sources": [source_json(s) for s in sources],
                            "missing_shards": list(getattr(sources, "missing_shards", ()))})

    async def answer(question: Question, ctx: Context, top_k: TopK = None,
                     model: ModelName = None) -> Annotated[CallToolResult, Answer]:
        """A short answer to a question, generated from the most relevant passages of the
        indexed collection, with those passages as its sources."""
        namespace = tenant_of(ctx) if tenant_of is not None else None
        rid = request_id_of(ctx) if request_id_of is not None else None
        r = await _call(ctx, "answer", rag_of().aquery(question, namespace=namespace, request_id=rid,
                                                       top_k=top_k, model=model))
        return tool_result({"answer": r.answer, "sources": [source_json(s) for s in r.sources],
                            "cache_tier": r.cache_tier, "model": r.model, "request_id": r.request_id,
                            "timings_ms": r.timings.as_dict(), "missing_shards": list(r.missing_shards)})

    tools = [_tool(retrieve, "Retrieve passages", read_only),
             _tool(answer, "Answer from the collection", read_only)]
    root = logging.getLogger()
    kept = root.handlers[:], root.level
    server: MCPServer = MCPServer("ragserve", version=version, instructions=INSTRUCTIONS, lifespan=lifespan,
                                  log_level="WARNING", tools=tools)
    # NOTE: MCPServer() calls logging.basicConfig (a rich handler on the root logger) when
    # the root has none: logging is the application's to configure, not a library's.
    root.handlers[:], root.level = kept
    return server


def _tool(fn: Callable[..., Any], title: str, annotations: ToolAnnotations) -> Tool:
    """``fn`` as a tool with structured output, whose published output schema has its
    ``$defs`` written in place (``schemas.inline_schema``): a client checks every result
    against it (the SDK's client with ``jsonschema``), and following a ``$ref`` there costs
    as much as the rest of the check (one per source of a result)."""
    tool = Tool.from_function(fn, title=title, annotations=annotations, structured_output=True)
    tool.fn_metadata.output_schema = inline_schema(tool.fn_metadata.output_schema)
    return tool


def tool_result(structured: dict[str, Any]) -> CallToolResult:
    """A tool's result: ``structured`` as its structured content and, for clients that read
    only text, the same object as one compact JSON text block (serialized once, by orjson)."""
    return CallToolResult(content=[TextContent(type="text", text=orjson.dumps(structured).decode())],
                          structured_content=structured)


async def _call(ctx: Context, tool: str, work: Any) -> Any:
    """Await one verb; a ragserve error becomes the call's tool error (the SDK answers it
    with ``is_error``), and anything else is the SDK's generic one, logged with its trace."""
    try:
        return await work
    except RagserveError as e:
        raise ToolError(tool_error_text(e)) from e


def tool_error_text(e: RagserveError) -> str:
    """``EmptyQuestionError [input]: the question is empty ...``: the type a program can
    match, the stage, and the sentence a model can act on."""
    text = f"{type(e).__name__} [{e.stage}]: {Exception.__str__(e)}"
    if isinstance(e, OverloadedError):
        text += " (nothing was started; retry in a moment)"
    return text
