"""Request bodies of the HTTP API (pydantic: FastAPI validates them and publishes their
JSON schema in ``/openapi.json``). Unknown fields of the native API are refused, so a
typo is a 422 that names it, not a silently ignored option."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class CacheOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    read: bool = True
    """Look the answer up in the cache tiers."""
    write: bool = True
    """Store a new answer in the cache tiers."""


class QueryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(description="The question; validated and normalised by the engine.")
    namespace: str | None = Field(default=None, max_length=256,
                                  description="Cache namespace; ignored when API keys are on (the key decides).")
    top_k: int | None = Field(default=None, ge=1, le=100, description="Chunks retrieved (default: query.top_k).")
    cache: CacheOptions = Field(default_factory=CacheOptions)
    timeout_s: float | None = Field(default=None, ge=0, le=3600,
                                    description="Deadline in seconds (0: none; default: query.timeout_s).")
    stream: bool = Field(default=False, description="Answer as Server-Sent Events: sources, token..., done.")
    # NOTE: typed Any and checked by the engine (400 InvalidParameterError naming the field),
    # not by pydantic: "high" or 10**9 is the same typed 400 in the body, the X-Priority
    # header and the Python API.
    priority: Any = Field(default=None, json_schema_extra={"type": "integer"},
                          description="Priority class, lower runs sooner (default: the API key's, else 0; "
                                      "also the X-Priority header). Within the key's max_priority.")
    # NOTE: Any for the same reason: a model that is not served (or not a string) is the
    # engine's typed 400 UnknownModelError, naming the served ones.
    model: Any = Field(default=None, json_schema_extra={"type": "string"},
                       description="One of the served models (GET /v1/models; default: [models] default, "
                                   "or the router's pick with route = \"auto\").")


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str
    top_k: int | None = Field(default=None, ge=1, le=100)


class ContentPart(BaseModel):
    """One part of a message's content; only ``text`` parts carry a question."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request. Extra fields that clients send (``user``,
    ``presence_penalty`` at its default, ...) are accepted and ignored; options that would
    change the answer are honoured or refused by ``openai_api.check_options``."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1)


class EvalQuestionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, description="Validated by the engine like any question.")
    answers: list[str] = Field(min_length=1, max_length=32, description="Gold answers (any one counts).")
    id: str | None = Field(default=None, max_length=256, description="Its id in the report (default: its position).")
    relevant: list[str] | dict[str, int] | None = Field(
        default=None, description="The documents that answer it (doc ids, or doc id: grade > 0), for the retrieval "
                                  "metrics; a question without them counts in none.")


class EvalVariant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    top_k: int | None = Field(default=None, ge=1, le=100, description="Chunks retrieved (default: query.top_k).")


class EvalRequest(BaseModel):
    """``POST /admin/eval``: the caller's questions with gold answers, answered once per
    configuration with the answer cache bypassed; per configuration, the report ``ragserve
    eval`` writes for the same questions (this body is a questions file) and index."""

    model_config = ConfigDict(extra="forbid")

    questions: list[EvalQuestionIn] = Field(min_length=1, max_length=1000)
    configs: list[EvalVariant] = Field(default_factory=lambda: [EvalVariant(name="served")], min_length=1,
                                       max_length=4)
    concurrency: int = Field(default=8, ge=1, le=64, description="Questions in flight at once, per configuration.")
    name: str = Field(default="request", min_length=1, max_length=256,
                      description="The question set's name in the reports (a questions file's `name`).")

    @field_validator("configs")
    @classmethod
    def _distinct_names(cls, v: list[EvalVariant]) -> list[EvalVariant]:
        names = [c.name for c in v]
        if len(set(names)) != len(names):
            raise ValueError(f"configuration names must differ, got {names}")
        return v


def inline_schema(model: Any) -> dict[str, Any]:
    """``model``'s JSON schema (a pydantic model, or a schema already) with its ``$defs``
    written in place: for ``openapi_extra``, where ``#/$defs/...`` would not resolve."""
    schema = model.model_json_schema() if isinstance(model, type) and issubclass(model, BaseModel) else model
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return walk({**defs[node["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in node.items() if k != "$ref"}})
            return {k: walk(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def _report_schema(field: dict[str, Any]) -> None:
    from pydantic import TypeAdapter

    from ragserve.eval.report import SCHEMA, EvalReport

    report = inline_schema(TypeAdapter(EvalReport).json_schema())
    report["properties"] = {"schema": {"type": "string", "const": SCHEMA}, **report["properties"]}
    report["required"] = ["schema", *report.get("required", [])]
    report["description"] = ("One configuration's report: what `ragserve eval QUESTIONS.json --index INDEX "
                             "--answers --top-k K --concurrency C --json` writes for the same questions and index "
                             "(docs/eval.md).")
    field.clear()
    field.update(report)


class EvalReportEntry(BaseModel):
    name: str = Field(description="The configuration's name.")
    report: dict[str, Any] = Field(json_schema_extra=_report_schema)


class EvalReports(BaseModel):
    """The reply of ``POST /admin/eval``: one report per configuration, in the request's order."""

    model_config = ConfigDict(populate_by_name=True)

    schema_: str = Field(alias="schema", description="ragserve.eval/2: the reports' shape and this list's.")
    reports: list[EvalReportEntry]
