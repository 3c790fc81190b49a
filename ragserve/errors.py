"""The one error tree of ragserve.

Every error names the stage that raised it and, where it applies, the path or field
that is wrong and what to do about it::

    RagserveError
    ├── ConfigError                 a config field has a bad value (names the field)
    │   └── NoL2Error               `ragserve warm` has no L2 to write to: the cache is
    │                               off or its Redis does not answer (jobs/warm.py)
    ├── InputError                  a request is refused before any work is done
    │   ├── EmptyQuestionError
    │   ├── QuestionTooLongError
    │   ├── QuestionTypeError       the question is not a str (None, a number, bytes)
    │   ├── InvalidTextError        not valid Unicode text, or a control character
    │   │                           (names the code point and its position)
    │   ├── InvalidParameterError   a request parameter (top_k, namespace) has a bad value
    │   ├── UnknownModelError       a request names a model that is not configured
    │   │                           (names the configured ones; HTTP 400, 404 on /v1 OpenAI routes)
    │   └── BatchInputError         a questions file for `ragserve batch` (jobs/batch.py)
    ├── IngestError                 a corpus cannot be read at all (per-file problems
    │                               are reported in the build summary, not raised)
    ├── DatasetError                an evaluation data set is missing or malformed (names
    │                               the file, the record and what is wrong)
    ├── CalibrationError            `ragserve calibrate-semantic`: the pairs cannot certify
    │                               the false-hit rate asked for (the tier stays off)
    ├── IndexError_                 an index cannot be served
    │   ├── IndexNotFoundError      no index at the path (suggests build-index)
    │   ├── IndexIntegrityError     a file is missing, truncated or altered, or the files
    │   │                           disagree with each other or the manifest (names the
    │   │                           file and the inconsistency)
    │   │   └── ShardError          a shard of a sharded index is missing, of another
    │   │                           dimension, or not the one the top manifest lists
    │   │                           (names the shard)
    │   ├── IndexWriteError         a build could not write, fsync, link or rename a file
    │   │                           of the new version (a full disk, an I/O error): names
    │   │                           the step and the file; the published version stays
    │   ├── ShardUnavailableError   a shard of a served sharded index has no replica that
    │   │                           answers now (Ray shard actors; names the shards):
    │   │                           HTTP 503, never a partial answer presented as whole
    │   └── IndexMismatchError      the index was built with another model/dimension
    ├── ModelError                  a model folder is missing or cannot be prepared
├── RedisServerError            the embedded Redis cannot start (no binary, no socket)
    ├── ClusterError                a Ray cluster cannot be used: ray is not installed
    │                               (names `pip install ragserve[ray]`), or the address is
    │                               malformed or unreachable (names the address)
    ├── OverloadedError             too many requests running and waiting: retry later
    │                               (ragserve's admission, or Ray Serve's queue bounds)
    ├── QuotaExceeded               an API key is over its own rate (requests/s or
    │                               generated tokens/min): retry after ``retry_after_s``
    ├── DeadlineExceededError       a request ran past its deadline; its engine request
    │                               was aborted (also a TimeoutError)
    ├── AuthError                   the server refused the API key: missing or not valid
    │                               (HTTP 401; raised by ``ragserve.client``)
    ├── RemoteError                 a ragserve server failed a request and no closer class
    │   │                           names the failure (404, 500, draining; ``ragserve.client``)
    │   └── ServerUnreachableError  no HTTP answer at all: refused, reset or cut connection
    ├── IntegrationError            a LangChain / LlamaIndex adapter cannot serve a call:
    │   │                           its source cannot (an AsyncClient asked to block)
    │   └── FrameworkNotInstalledError  the framework is not installed (names the extra;
    │                               also an ImportError)
    └── GenerationError             the generation stage failed for one request
        ├── EngineDeadError         the engine is gone; every later request fails too
        └── GeneratorUnavailableError  no generator endpoint can take a request now
                                    (all refused or ejected); later ones may succeed

``IndexError_`` carries a trailing underscore so it never shadows the builtin; it is
exported as ``RagIndexError``.

``ragserve.client`` raises the same classes as the in-process API, rebuilt from the
server's error body (``restore``), with the HTTP facts as attributes: ``status``,
``request_id``, ``error_type`` (the server's name for it), ``retry_after_s``, ``attempts``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar


class RagserveError(Exception):
    """Base of every error ragserve raises on purpose."""

    stage: str = "ragserve"

    def __init__(self, message: str, *, stage: str | None = None) -> None:
        if stage is not None:
            self.stage = stage
        super().__init__(message)

    def __str__(self) -> str:
        return f"[{self.stage}] {super().__str__()}"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle without calling the subclass's ``__init__`` again. Ray pickles what an
        actor or task raises; the default (``cls(*args)``) fails for every subclass whose
        ``__init__`` takes other arguments than its message (``OverloadedError(in_flight,
        queued)``), and the caller then gets Ray's ``UnserializableException`` instead of
        an error the HTTP layer maps to 429 or 504. Rebuilding from ``args`` and
        ``__dict__`` works for every subclass, present and future."""
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


E = TypeVar("E", bound=RagserveError)


def restore(cls: type[E], message: str, **attributes: Any) -> E:
    """An error of class ``cls`` with ``message`` (without its ``[stage]`` prefix) and
    ``attributes`` (``stage`` among them), made without calling ``cls.__init__``: its
    arguments belong to the place that raises it (``OverloadedError(in_flight, queued)``),
    and a copy made elsewhere, as ``ragserve.client`` makes one from an HTTP error body,
    has only the message and what it is told."""
    return _rebuild(cls, (message,), attributes)  # type: ignore[return-value]


def _rebuild(cls: type[RagserveError], args: tuple[Any, ...], state: dict[str, Any]) -> RagserveError:
    """The error ``RagserveError.__reduce__`` pickled: its class, message and attributes
    (``stage``, ``path``, ``field``...), as they were when it was raised."""
    error = cls.__new__(cls)
    # NOTE: BaseException's own __init__ sets ``args`` and nothing else, whatever the bases
    # (DeadlineExceededError is also an OSError, whose __init__ reads errno from its args).
    BaseException.__init__(error, *args)
    error.__dict__.update(state)
    return error


class ConfigError(RagserveError, ValueError):
    stage = "config"

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class NoL2Error(ConfigError):
    """Nothing to warm into: the answer cache is off, or its Redis does not answer."""


class InputError(RagserveError, ValueError):
    stage = "input"


class EmptyQuestionError(InputError):
    def __init__(self) -> None:
        super().__init__("the question is empty or only whitespace")


class QuestionTooLongError(InputError):
    def __init__(self, length: int, limit: int, unit: str = "characters") -> None:
        self.length = length
        self.limit = limit
        hint = (
            "raise query.max_question_chars to allow longer questions"
            if unit.startswith("characters")
            else "raise generate.max_model_len or lower generate.max_tokens"
        )
        super().__init__(f"the question has {length} {unit}, over the limit of {limit} ({hint})")


class QuestionTypeError(InputError):
    """The question is not a ``str``: the message names the type it got instead."""

    def __init__(self, value: object) -> None:
        self.type_name = type(value).__name__
        hint = ("; decode it first, e.g. data.decode('utf-8')"
                if isinstance(value, (bytes, bytearray, memoryview)) else "")
        super().__init__(f"the question must be a str, got {self.type_name}{hint}")


class InvalidTextError(InputError):
    """Text that cannot be a question: a lone surrogate (not Unicode text at all) or a
    control character. The message names the code point and where it is, never the text
    itself (printing a lone surrogate back would fail in turn)."""

    def __init__(self, what: str, problem: str, position: int | None = None) -> None:
        self.what = what
        self.position = position
        super().__init__(f"the {what} {problem}")


class InvalidParameterError(InputError):
    """A request parameter other than the question has a value it cannot take."""

    def __init__(self, name: str, value: object, expected: str) -> None:
        self.name = name
        shown = repr(value) if isinstance(value, (int, float, str)) and len(repr(value)) < 40 else type(value).__name__
        super().__init__(f"{name} must be {expected}, got {shown}")


class UnknownModelError(InputError):
    """A request names a model ``[models]`` does not configure. ``model`` is the name asked
    for, ``known`` the names that are served."""

    def __init__(self, model: object, known: tuple[str, ...]) -> None:
        self.model = model
        self.known = tuple(known)
        shown = repr(model) if isinstance(model, str) and len(model) < 80 else type(model).__name__
        super().__init__(f"model {shown} is not served here; served: {', '.join(map(repr, self.known))} "
                         "(see GET /v1/models)")


class BatchInputError(InputError):
    """The questions file cannot be used as it is (names the line and what is wrong)."""


class IngestError(RagserveError):
    stage = "ingest"


class DatasetError(RagserveError):
    """An evaluation data set (SQuAD JSON or BEIR folder) cannot be used as given."""

    stage = "eval"

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


class CalibrationError(RagserveError):
    """The labelled pairs cannot certify the semantic tier's false-hit rate ≤ alpha with
    confidence 1 - delta at any threshold: the tier is not turned on."""

    stage = "calibrate"


class IndexError_(RagserveError):
    stage = "index"

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = Path(path)
        self.detail = message
        """What is wrong, without the path (a caller that adds context re-raises with it)."""
        super().__init__(f"{self.path}: {message}")


class IndexNotFoundError(IndexError_):
    def __init__(self, path: Path | str, what: str = "no index folder") -> None:
        super().__init__(
            path,
            f"{what}; build one with `ragserve build-index SOURCE --out {path}`",
        )


class IndexIntegrityError(IndexError_):
    """A file of the index does not match its manifest (missing, truncated, altered), or
    the files do not agree with each other (structure.py, contents.py)."""


class ShardError(IndexIntegrityError):
    """One shard of a sharded index cannot be served with the others: missing, of another
    dimension or type, or not the version the top manifest lists (its fingerprint differs).
    ``shard`` names it (``shard-002``); the whole set is refused, never a part of it."""

    def __init__(self, path: Path | str, shard: str, message: str) -> None:
        self.shard = shard
        super().__init__(path, f"shard {shard}: {message}")


class IndexWriteError(IndexError_):
    """A file of a new index version could not be written, synced, linked or renamed into
    place (``step``: "write", "fsync", "link" or "rename"; ``errno`` and ``reason`` from the
    OS). Raised before the new version is published: the index the path names is the one
    it named before the build, and the half-written folder is removed."""

    def __init__(self, path: Path | str, step: str, reason: str, errno: int | None = None) -> None:
        self.step = step
        self.reason = reason
        self.errno = errno
        super().__init__(path, f"could not {step} it: {reason}")

    @classmethod
    @contextmanager
    def during(cls, step: str, path: Path | str) -> Iterator[None]:
        """Turn an ``OSError`` raised inside the block into this error, naming ``step``
        and ``path`` (the file's final name in the folder, not a temporary one)."""
        try:
            yield
        except OSError as e:
            raise cls(path, step, e.strerror or str(e), e.errno) from e


class ShardUnavailableError(IndexError_):
    """No replica of one or more shards answered a search (``serve --ray`` with a sharded
    index: every shard actor of the shard died, is being replaced, or timed out). The
    request gets HTTP 503 with ``Retry-After`` rather than the top-k of the other shards
    presented as whole. ``shards`` names the missing shards (``shard-001``)."""

    stage = "search"

    def __init__(self, path: Path | str, shards: list[str], why: str) -> None:
        self.shards = list(shards)
        super().__init__(path, f"no replica of {', '.join(self.shards)} answered ({why}); "
                               "Ray restarts a failed shard actor: retry")


class IndexMismatchError(IndexError_):
    """The index was built for another embedding model or dimension."""


class ModelError(RagserveError):
    stage = "model"


class RedisServerError(RagserveError):
    """The embedded Redis cannot start: no ``redis-server`` binary, or it did not come up."""

    stage = "cache"


class ClusterError(RagserveError):
    """The Ray paths (``build-index --ray``) cannot reach or use a Ray cluster."""

    stage = "cluster"


class OverloadedError(RagserveError):
    """Refused at admission: ``query.max_in_flight`` runs and ``query.max_queued``
    waiters are taken. Nothing was started; the caller may retry later."""

    stage = "admission"

    def __init__(self, in_flight: int, queued: int, message: str = "") -> None:
        self.in_flight = in_flight
        self.queued = queued
        super().__init__(message or f"overloaded: {in_flight} requests running and {queued} waiting "
                         "(query.max_in_flight, query.max_queued); retry later")


class QuotaExceeded(RagserveError):
    """Refused at the server's edge: the API key's token bucket (``requests_per_s`` with
    ``burst``, or ``tokens_per_min``, in the keys file) is empty. Unlike
    ``OverloadedError`` it says nothing about the engine, only about this tenant: its
    other requests wait ``retry_after_s`` (computed from the bucket), others are not
    affected. Nothing was started (HTTP 429 with ``Retry-After``)."""

    stage = "quota"

    def __init__(self, tenant: str, bucket: str, retry_after_s: float) -> None:
        self.tenant = tenant
        self.bucket = bucket
        self.retry_after_s = retry_after_s
        what = "requests per second" if bucket == "requests" else "generated tokens per minute"
        super().__init__(f"API key {tenant!r} is over its quota of {what}; retry after {retry_after_s:.2f} s")


class DeadlineExceededError(RagserveError, TimeoutError):
    """The request ran past its deadline; its work was cancelled and nothing was cached."""

    stage = "deadline"

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        super().__init__(f"no answer within the deadline of {timeout_s:g} s; the request was aborted")


class GenerationError(RagserveError):
    stage = "generate"


class EngineDeadError(GenerationError):
    """The generation engine has stopped; the RAG object must be recreated."""


class GeneratorUnavailableError(GenerationError):
    """No endpoint of a remote generator (the ``openai`` backend) could take the request:
    every one refused it, timed out or is ejected until a probe finds it healthy again.
    Nothing was generated; the caller may retry later (HTTP 503)."""


class AuthError(RagserveError):
    """The server refused the request's API key (HTTP 401): none was sent, or it is not
    one of the server's (``server.api_keys_file``). Retrying does not help."""

    stage = "auth"


class RemoteError(RagserveError):
    """A ragserve server failed a request in a way no closer class names: a wrong URL
    (404), a server bug (500), a server draining or shut down (503), an answer that is not
    ragserve's (a proxy's HTML page). ``status`` is the HTTP status (None without one)."""

    stage = "http"


class IntegrationError(RagserveError):
    """An adapter of ``ragserve.integrations`` cannot serve a call: it was given a source
    that is neither a ``RAG`` nor a client, a blocking call reached an ``AsyncClient`` (it
    has only async verbs), or the framework it adapts to is not installed."""

    stage = "integration"


class FrameworkNotInstalledError(IntegrationError, ImportError):
    """An adapter's framework is not installed: the message names the extra that installs
    it (``pip install 'ragserve[langchain]'``). Also an ``ImportError``, so code that
    guards an optional import with ``except ImportError`` keeps working."""

    def __init__(self, framework: str, extra: str, missing: str) -> None:
        super().__init__(f"{framework} is not installed (no module {missing!r}): "
                         f"pip install 'ragserve[{extra}]'")
        self.name = missing


class ServerUnreachableError(RemoteError):
    """No HTTP answer at all: the connection was refused, reset or cut before the answer
    was complete (a server down, restarting, or behind a wrong address)."""
