"""``POST /admin/eval``: compare configurations of the running engine on the caller's questions.

The caller sends questions with gold answers (and, for the retrieval metrics, the
documents that answer them) and up to four configurations (what one request may change:
``top_k``); each question is answered once per configuration with the answer cache
bypassed. The reply is ``eval/compare.py``'s ``{"schema": "ragserve.eval/2", "reports":
[{"name", "report"}]}``: each report is the one ``ragserve eval`` writes with ``--json``
for the same questions and index (``eval/report.py`` builds both), with each stage's
p50/p95 beside the scores.

It is an admin route (the admin key, not a tenant's): one call can ask the engine for
thousands of generations. The questions go through admission like any request, so a full
engine refuses them with the usual 429 rows instead of queueing without bound.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.responses import Response

from ragserve.eval.compare import Variant, acompare
from ragserve.eval.datasets import parse_questions
from ragserve.server.auth import check_admin
from ragserve.server.common import Served, until_disconnected
from ragserve.server.httperrors import json_response
from ragserve.server.schemas import EvalReports, EvalRequest, inline_schema


def add_eval_routes(app: FastAPI, served: Served) -> None:
    # NOTE: the body is read by hand (the key is checked before it), so its schema is
    # given to the OpenAPI document here rather than taken from a parameter.
    @app.post("/admin/eval", summary="Answer and score questions under one or more configurations (admin key)",
              response_model=EvalReports, openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": inline_schema(EvalRequest)}}}})
    async def evaluate(request: Request) -> Response:
        # The key before the body: a caller without it learns nothing about the schema.
        check_admin(served.admin_key, request.headers.get("authorization"))
        try:
            req = EvalRequest.model_validate_json(await request.body())
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        served.check_engine()
        questions = parse_questions([q.model_dump() for q in req.questions])
        variants = [Variant(c.name, c.top_k) for c in req.configs]
        report = await until_disconnected(request, acompare(served.rag, questions, variants,
                                                            concurrency=req.concurrency, name=req.name))
        return json_response(report)
