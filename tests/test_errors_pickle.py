"""Every error of ragserve's tree survives pickling with its class, message, stage and
attributes (issue 12).

Ray pickles what an actor or task raises to give it to the caller. An error whose
``__init__`` takes other arguments than its ``args`` cannot be unpickled by default
(pickle calls ``cls(*args)``): the caller then gets Ray's ``UnserializableException``
instead of, say, ``OverloadedError``, and the HTTP layer answers 500 where it should
answer 429. The table below names constructor arguments for every subclass; a new
subclass without an entry fails the test, so the table stays complete.
"""

from __future__ import annotations

import ast
import importlib
import pickle
from pathlib import Path
from typing import Any

import pytest

import ragserve
from ragserve.errors import OverloadedError, RagserveError

PACKAGE = Path(ragserve.__file__).parent

# "module.Class" -> (positional args, keyword args) that construct one instance.
CONSTRUCT: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "ragserve.errors.RagserveError": (("something went wrong",), {"stage": "custom"}),
    "ragserve.errors.ConfigError": (("query.top_k", "must be at least 1"), {}),
    "ragserve.errors.InputError": (("a bad request",), {}),
    "ragserve.errors.EmptyQuestionError": ((), {}),
    "ragserve.errors.QuestionTooLongError": ((5000, 4096, "tokens"), {}),
    "ragserve.errors.QuestionTypeError": ((b"bytes",), {}),
    "ragserve.errors.InvalidTextError": (("question", "has a control character U+0007 at 3", 3), {}),
    "ragserve.errors.InvalidParameterError": (("top_k", -1, "an int of at least 1"), {}),
    "ragserve.errors.UnknownModelError": (("medium", ("small", "large")), {}),
    "ragserve.errors.IngestError": (("no such folder: /corpus",), {}),
    "ragserve.errors.DatasetError": (("/data/squad.json", "record 3 has no answers"), {}),
    "ragserve.errors.CalibrationError": (("no threshold certifies a false-hit rate <= 0.01",), {}),
    "ragserve.errors.IndexError_": (("/idx", "cannot be served"), {}),
    "ragserve.errors.IndexNotFoundError": (("/idx",), {}),
    "ragserve.errors.IndexIntegrityError": (("/idx", "vectors.npy is truncated"), {}),
    "ragserve.errors.ShardError": (("/idx/shard-001", "shard-001", "missing"), {}),
    "ragserve.errors.IndexWriteError": (("/idx/.building-7/chunks.jsonl", "write", "No space left on device", 28),
                                        {}),
    "ragserve.errors.ShardUnavailableError": (("/idx", ["shard-001"], "ActorDiedError"), {}),
    "ragserve.errors.IndexMismatchError": (("/idx", "built for dimension 768, the model has 384"), {}),
    "ragserve.errors.ModelError": (("no model folder at /models/x",), {}),
    "ragserve.errors.ClusterError": (("ray://nowhere:10001 does not answer",), {}),
    "ragserve.errors.OverloadedError": ((8, 16), {}),
    "ragserve.errors.QuotaExceeded": (("tenant-a", "requests", 1.5), {}),
    "ragserve.errors.DeadlineExceededError": ((2.5,), {}),
    "ragserve.errors.GenerationError": (("vLLM refused it",), {"stage": "generate.remote"}),
    "ragserve.errors.EngineDeadError": (("the engine is gone",), {}),
    "ragserve.errors.GeneratorUnavailableError": (("every endpoint refused",), {}),
    "ragserve.errors.NoL2Error": (("cache.redis_url", "does not answer"), {}),
    "ragserve.errors.BatchInputError": (("questions.jsonl line 3: no question",), {}),
    "ragserve.errors.RedisServerError": (("no redis-server binary",), {}),
    "ragserve.errors.AuthError": (("the API key is not valid",), {}),
    "ragserve.errors.RemoteError": (("HTTP 500: internal error",), {}),
    "ragserve.errors.ServerUnreachableError": (("http://127.0.0.1:1: connection refused",), {}),
    "ragserve.errors.IntegrationError": (("AsyncClient has only async verbs",), {}),
    "ragserve.errors.FrameworkNotInstalledError": (("LangChain", "langchain", "langchain_core"), {}),
}


def _modules_defining_errors() -> list[str]:
    """The package's modules that define a class with a base named ``...Error`` (or
    ``IndexError_``): importing them registers every subclass of RagserveError, including
    ones added later in a new module. An AST scan, so no other module is imported."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text("utf-8"), str(path))
        bases = [b for node in ast.walk(tree) if isinstance(node, ast.ClassDef) for b in node.bases]
        if any(isinstance(b, ast.Name) and b.id.endswith(("Error", "Error_")) for b in bases):
            parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def _all_error_classes() -> list[type[RagserveError]]:
    for module in _modules_defining_errors():
        importlib.import_module(module)
    todo, seen = [RagserveError], []
    while todo:
        cls = todo.pop()
        # Ray's RayTaskError(OverloadedError) classes subclass ours too: only the package's own.
        if cls.__module__.startswith("ragserve.") and cls not in seen:
            seen.append(cls)
        todo += cls.__subclasses__()
    return sorted(seen, key=_name)


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _picklers() -> list[Any]:
    picklers: list[Any] = [pickle]
    try:
        from ray import cloudpickle
    except ImportError:
        pass
    else:
        picklers.append(cloudpickle)
    return picklers


ERRORS = _all_error_classes()


def test_the_table_names_every_subclass():
    missing = sorted(_name(c) for c in ERRORS if _name(c) not in CONSTRUCT)
    assert not missing, f"add constructor arguments to CONSTRUCT for: {missing}"
    stale = sorted(set(CONSTRUCT) - {_name(c) for c in ERRORS})
    assert not stale, f"CONSTRUCT names classes that no longer exist: {stale}"


@pytest.mark.parametrize("pickler", _picklers(), ids=lambda p: p.__name__)
@pytest.mark.parametrize("cls", ERRORS, ids=_name)
def test_an_error_round_trips_with_its_class_message_stage_and_attributes(cls, pickler):
    args, kwargs = CONSTRUCT[_name(cls)]
    error = cls(*args, **kwargs)
    back = pickler.loads(pickler.dumps(error))
    assert type(back) is cls
    assert str(back) == str(error) and back.args == error.args
    assert back.stage == error.stage
    assert back.__dict__ == error.__dict__


def test_an_overloaded_error_keeps_its_numbers_and_can_be_raised_again():
    error = pickle.loads(pickle.dumps(OverloadedError(3, 4, "overloaded: try later")))
    assert (error.in_flight, error.queued, str(error)) == (3, 4, "[admission] overloaded: try later")
    with pytest.raises(OverloadedError, match="try later"):
        raise error


@pytest.mark.ray
def test_an_error_raised_in_a_ray_task_reaches_the_caller_as_itself(ray_cluster):
    import ray
    from ray.exceptions import RayTaskError

    @ray.remote(num_cpus=0)
    def refuse() -> None:
        raise OverloadedError(8, 16, "overloaded: the replica is full")

    with pytest.raises(RayTaskError) as caught:
        ray.get(refuse.remote())
    cause = caught.value.cause
    assert type(cause) is OverloadedError
    assert (str(cause), cause.stage) == ("[admission] overloaded: the replica is full", "admission")
    assert (cause.in_flight, cause.queued) == (8, 16)
    assert isinstance(caught.value, OverloadedError)  # as_instanceof_cause: what ray.get raises
