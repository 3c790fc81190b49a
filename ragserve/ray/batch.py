"""``run_batch_ray``: ``ragserve batch`` on a Ray cluster (``ragserve batch --ray``).

The same file in, the same file out, the same resume and per-question errors as
``run_batch`` (``jobs/batch.py``); the answering runs in a pool of Ray Data actors:

- The driver (this process) reads and checks the questions file and skips the ids that
  already have an answer in the output, exactly as ``run_batch`` does. It resolves the
  index path once: every actor opens that version, even if a build flips the path meanwhile.
- The remaining ``(id, question)`` rows become a Ray Data dataset, and ``map_batches`` hands
  them to ``actors`` ``Answerer`` actors, a CPU each. Each opens the index with
  ``RAG.from_index`` and a generator that is not a local vLLM:
  - ``generate.backend = "openai"``: the openai backend itself, in every actor (each with
    its own pooled connections and least-outstanding routing over ``openai.urls``);
  - ``"vllm"``: a ``RayGenerator`` over a generator deployment the driver deploys for this
    run (``ray.serve``'s own, with the ``ray.generator_*`` options; one replica on a CPU
    machine, whose engine batches every actor's requests), deleted at the end.
  - ``[models]``: the ``vllm`` models are grouped as ``serve --ray`` groups them
    (``deployed_groups``, over ``serve/app.generator_groups``: the models ``ragserve serve``
    would run on one engine, by ``generators.vllm.engine_key``, share one), a generator
    deployment per group; each actor holds a ``RayGenerator`` per such model over its
    group's deployment (naming its model on every call, as an ingress replica does), and
    the ``openai`` models' own backend. Each line is asked of its own ``"model"`` (else
    the run's ``model``), and its record says which model answered.
- An actor answers its batch concurrently (``work_through``); a question that fails is its
  error record, never a failed batch.
- The records come back as batches finish, and the driver appends and flushes each one as
  ``run_batch`` does, with the same lines: ``batch`` and ``batch --ray`` resume each
  other's output.

``concurrency`` is the questions in flight over the whole run, as for ``run_batch`` (each
actor takes its share), so the engine sees the same load either way. NOTE: an actor's next
batch starts when its last one is all done, so the slowest answer of a batch holds its
share of slots; batches of ``ROUNDS_PER_BATCH`` times that share keep the loss small and
the records still come back often. An interrupted run loses the batches in flight.

``summary.seconds`` runs from the start of the dataset: the actors' start-up (each loads
the embedding model) is in it; the cluster's and the generator deployment's are not, as
``ragserve batch`` does not count its engine's start.

On more than one machine: install ragserve and the embedding model on every node (with
``vllm``, the tokenizer files of ``generate.model`` too), and put the index at the same
path on every node (a shared file system). An L2 cache must be a Redis every node reaches
(``cache.redis_url``); ``"embedded"`` is refused: one per actor would share nothing.

**Usage:** ``summary = run_batch_ray("indexes/docs", "questions.jsonl", "answers.jsonl", address="auto")``
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ragserve.errors import BatchInputError, ClusterError, RagserveError
from ragserve.jobs.batch import (
    BatchSummary,
    _record,
    answered_ids,
    check_questions,
    read_lines,
    write_record,
)
from ragserve.ray.cluster import (
    INSTALL_HINT,
    cluster_target,
    import_ray,
    quiet_ray_data,
    ray_session,
    refuse_unshared_l2,
)

__all__ = ["Answerer", "deployed_groups", "plan_actors", "run_batch_ray"]

ACTOR_CPUS = 1.0
"""CPUs an answering actor reserves: it embeds questions and searches; generation is elsewhere."""
ROUNDS_PER_BATCH = 4
"""A batch is this many times an actor's questions in flight (see the module docstring)."""
START_FAILED = "an answering actor could not start"
ACTOR_START_TIMEOUT_S = 600
"""How long Ray Data may take to start the actors (each loads the embedding model) before
the run fails; without a bound it would wait for ever for CPUs the cluster does not have."""


@dataclass(frozen=True)
class ActorPlan:
    actors: int
    per_actor: int
    """Questions one actor has in flight at once."""
    batch_size: int


def plan_actors(questions: int, concurrency: int, actors: int | None, free_cpus: float) -> ActorPlan:
    """How many actors, each with how many questions in flight, in batches of how many.
    ``actors`` None: one per free CPU of the cluster; never more actors than questions."""
    if concurrency < 1:
        raise BatchInputError(f"concurrency must be >= 1, got {concurrency}")
    if actors is not None and actors < 1:
        raise ClusterError(f"--ray-actors must be >= 1, got {actors}")
    n = actors or max(1, int(free_cpus // ACTOR_CPUS))
    n = max(1, min(n, questions))
    per_actor = math.ceil(concurrency / n)
    # a small file: every actor still gets a batch
    batch = max(1, min(per_actor * ROUNDS_PER_BATCH, math.ceil(questions / n)))
    return ActorPlan(n, per_actor, batch)


def run_batch_ray(
    index: str | Path,
    questions: str | Path,
    out: str | Path,
    config: Any = None,
    *,
    address: str | None = None,
    actors: int | None = None,
    concurrency: int = 16,
    timeout_s: float | None = None,
    model: str | None = None,
    on_start: Callable[[BatchSummary], None] | None = None,
    on_record: Callable[[dict[str, Any], BatchSummary], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> BatchSummary:
    """Answer every question of ``questions`` not yet answered in ``out`` on a Ray cluster
    (see the module docstring). ``address`` as for ``cluster.ray_session`` (default:
    ``ray.address``, else this process's connection, a running cluster or a local one);
    ``actors``: default one per CPU left free; ``on_start`` and ``on_record`` as for
    ``run_batch``; ``say``: a function given a line about the cluster and the plan. ``model``
    and a line's ``"model"``: as for ``run_batch`` (one not configured is refused before any
    cluster starts); with ``[models]``, a generator deployment per group of ``vllm`` models
    (``deployed_groups``) and the ``openai`` models' servers called from every actor."""
    from ragserve.config import RAGConfig
    from ragserve.index.manifest import read_manifest

    config = config or RAGConfig.load()
    lines = read_lines(questions)
    items = [(qid, q) for qid, q, _ in lines]
    check_questions(items, config.query.max_question_chars, questions)
    for name in sorted({model, *(m for _, _, m in lines)} - {None}):
        config.models.check(name)
    refuse_unshared_l2(config, "ragserve batch --ray", "actor", l2_required=False)
    plan_actors(len(items), concurrency, actors, 0.0)  # refuses a bad --concurrency or --ray-actors now
    folder = read_manifest(index).folder  # a missing index fails before any cluster starts
    done_ids = answered_ids(out)
    todo = [(qid, q, m or model) for qid, q, m in lines if qid not in done_ids]
    summary = BatchSummary(total=len(items), skipped=len(items) - len(todo))
    if not todo:
        if on_start:
            on_start(summary)
        return summary
    ray = import_ray()
    _import_ray_data()
    say = say or (lambda line: None)
    address, local_cpus = cluster_target(address, None, config.ray)
    # Ray Data's errors are still logged to the console; ragserve's come back as themselves.
    with ray_session(address, num_cpus=local_cpus) as info, \
            _generator_deployments(config, say) as deployments, \
            quiet_ray_data(ACTOR_START_TIMEOUT_S, logging.ERROR, raise_original_map_exception=True):
        plan = plan_actors(len(todo), concurrency, actors, ray.available_resources().get("CPU", 0.0))
        say(f"Ray cluster at {info.address} ({info.how}, {info.nodes} node(s), {info.cpus:g} CPUs): "
            f"{plan.actors} actor(s) x {plan.per_actor} questions at once, batches of {plan.batch_size}; "
            f"generation: {_generation(config, deployments)}")
        dataset = _dataset(ray, todo, str(folder), config, deployments, plan, timeout_s)
        if on_start:  # here, not before the cluster and the engine start: the progress clock starts now
            on_start(summary)
        _write(dataset, out, summary, on_record)
    return summary


def _write(dataset: Any, out: str | Path, summary: BatchSummary,
           on_record: Callable[[dict[str, Any], BatchSummary], None] | None) -> None:
    """Run ``dataset`` and append each record to ``out`` as it comes back, as ``run_batch``."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(out, "ab") as sink:
        try:
            for row in _rows(dataset):
                line: str = row["line"]
                write_record(sink, line.encode(), orjson.loads(line), summary, started, on_record)
        finally:
            sink.flush()
            os.fsync(sink.fileno())
            summary.seconds = time.perf_counter() - started


def _rows(dataset: Any) -> Iterator[dict[str, Any]]:
    """The dataset's rows. An actor that cannot start (its index, its embedding model, its
    generator) fails the run with a ClusterError that says why."""
    import ray

    try:
        yield from dataset.iter_rows()
    except RagserveError:
        raise
    except ray.exceptions.GetTimeoutError as e:  # wait_for_min_actors_s
        free = ray.available_resources().get("CPU", 0.0)
        raise ClusterError(f"the answering actors ({ACTOR_CPUS:g} CPU each) did not start within "
                           f"{ACTOR_START_TIMEOUT_S} s; the cluster has {free:g} CPUs free: lower "
                           f"--ray-actors ({e})") from None
    except Exception as e:  # noqa: BLE001 - Ray wraps what an actor raised
        why = _start_failure(e)
        if why is None:
            raise
        raise ClusterError(why) from None


def _start_failure(e: BaseException | None) -> str | None:
    """What ``Answerer.__init__`` raised, from the error Ray gives the driver. NOTE: from its
    text: ``ActorDiedError`` keeps only the text of an actor's failed ``__init__`` (not the
    error, though ragserve's errors unpickle), so ``__init__`` raises every failure as a
    ClusterError whose message says ``START_FAILED``."""
    for _ in range(10):
        if e is None:
            return None
        for line in reversed(str(e).splitlines()):
            if START_FAILED in line:
                return line[line.index(START_FAILED):].strip()
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def deployed_groups(config: Any) -> list[tuple[str, tuple[str, ...]]]:
    """``(deployment name, models it serves)`` per generator deployment a run deploys:
    ``serve/app.generator_groups`` (vLLM models grouped by ``generators.vllm.engine_key``,
    the default model's group first; without ``[models]`` the one ``[generate]`` model,
    ``()``) but the ``openai`` ones, whose servers every actor calls itself."""
    from ragserve.ray.serve.app import generator_groups

    return [(name, models) for name, models in generator_groups(config)
            if (config.model_config(models[0]) if models else config).generate.backend != "openai"]


def _dataset(ray: Any, todo: list[tuple[str, str, str | None]], index: str, config: Any,
             deployments: dict[str, tuple[str, str]], plan: ActorPlan, timeout_s: float | None) -> Any:
    from ray.data import ActorPoolStrategy

    rows = [{"id": qid, "question": q, "model": m or ""} for qid, q, m in todo]
    # NOTE: the pool size goes through ``compute``: map_batches' ``concurrency`` is deprecated in Ray 2.60.
    return ray.data.from_items(rows).map_batches(
        Answerer, batch_size=plan.batch_size, batch_format="numpy", num_cpus=ACTOR_CPUS,
        compute=ActorPoolStrategy(size=plan.actors),
        fn_constructor_kwargs={"index": index, "config": config.to_dict(), "deployments": deployments,
                               "concurrency": plan.per_actor, "timeout_s": timeout_s})


class Answerer:
    """A Ray Data actor: opens the index once, then answers one batch of ``id`` and
    ``question`` columns per call into a ``line`` column of ``ragserve batch`` records.

    ``config``: ``RAGConfig.to_dict()``; ``deployments``: per model ("": the one
    ``[generate]`` model) the Serve application and generator deployment that serve it
    (``_generator_deployments``); a model in none of them (the openai ones) gets its
    configured backend in this actor.
    """

    def __init__(self, index: str, config: dict[str, Any], deployments: dict[str, tuple[str, str]],
                 concurrency: int, timeout_s: float | None) -> None:
        from ragserve.config import RAGConfig
        from ragserve.rag import RAG

        cfg = RAGConfig().replace(**config)
        # one loop for every batch: the pipeline hands results back to the caller's loop
        self.loop = asyncio.new_event_loop()
        try:
            gens = self.loop.run_until_complete(_ray_generators(cfg, deployments)) if deployments else {}
            generator = gens.pop("", None)
            self.rag = RAG.from_index(index, cfg, generator=generator, generators=gens or None)
        except Exception as e:  # noqa: BLE001 - told to the driver as text (see _start_failure)
            self.loop.close()
            raise ClusterError(f"{START_FAILED} on {socket.gethostname()}: {type(e).__name__}: {e}") from None
        self.concurrency, self.timeout_s = concurrency, timeout_s

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from ragserve.jobs.batch import work_through

        ids = [str(x) for x in batch["id"]]
        questions = [str(x) for x in batch["question"]]
        models = [str(x) or None for x in batch["model"]] if "model" in batch else [None] * len(ids)
        lines: list[str] = [""] * len(ids)

        async def ask(i: int) -> Any:
            return await self.rag.aquery(questions[i], timeout_s=self.timeout_s, model=models[i])

        def done(i: int, result: Any) -> None:
            lines[i] = orjson.dumps(_record(ids[i], questions[i], result)).decode()

        self.loop.run_until_complete(work_through(range(len(ids)), ask, done, self.concurrency))
        return {"line": np.array(lines, dtype=object)}


async def _ray_generators(cfg: Any, deployments: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """A ``RayGenerator`` per model of ``deployments`` (up and warm: the driver's
    ``serve.run`` returned), with the prompt's tokenizer here (``ingress.model_generators``)."""
    from ray import serve

    from ragserve.ray.serve.ingress import model_generators

    handles = {where: serve.get_deployment_handle(where[1], app_name=where[0])  # one per deployment
               for where in set(deployments.values())}
    return await model_generators({model: handles[where] for model, where in deployments.items()}, cfg)


@contextlib.contextmanager
def _generator_deployments(config: Any, say: Callable[[str], None]) -> Iterator[dict[str, tuple[str, str]]]:
    """A generator deployment of ``ray.serve`` per group of ``deployed_groups``, each as a
    Serve application of its own for this run (unique names: runs do not replace each
    other's), without an HTTP proxy, deleted at the end; yields per model ("": the one
    ``[generate]`` model) its ``(application, deployment)``. Only openai models: ``{}``."""
    groups = deployed_groups(config)
    if not groups:
        yield {}
        return
    from ray import serve

    from ragserve.ray.serve.app import generator_options
    from ragserve.ray.serve.generator import GeneratorServer

    base = f"{config.ray.app_name}-batch-{uuid.uuid4().hex[:8]}"
    where: dict[str, tuple[str, str]] = {}
    with contextlib.ExitStack() as stack:
        if not _serve_running():
            serve.start(proxy_location="Disabled")
            stack.callback(_shutdown_serve_if_idle)
        for i, (deployment, models) in enumerate(groups):
            name = base if i == 0 else f"{base}-{i}"
            first = config.model_config(models[0]) if models else config
            of = f" for {', '.join(map(repr, models))}" if models else ""
            say(f"deploying the generator ({first.generate.model}){of} as Serve application {name!r}; "
                "waiting for its engine")
            stack.callback(serve.delete, name)  # also when its start fails
            generator = serve.deployment(GeneratorServer, name=deployment, **generator_options(config))
            serve.run(generator.bind(config.to_dict(), None, models), name=name, route_prefix=None,
                      logging_config={"enable_access_log": False})
            where.update({m: (name, deployment) for m in models or ("",)})
        yield where


def _shutdown_serve_if_idle() -> None:
    """Stop the Serve this run started, unless another application came meanwhile."""
    from ray import serve

    if not serve.status().applications:
        serve.shutdown()


def _serve_running() -> bool:
    """Whether Serve's controller already runs on the cluster (then it stays after the run)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def _generation(config: Any, deployments: dict[str, tuple[str, str]]) -> str:
    r, names = config.ray, config.models.names
    if not names:
        if not deployments:
            return f"openai backend in every actor ({len(config.openai.urls)} server(s))"
        return (f"generator deployment {deployments[''][0]!r} ({config.generate.backend}, "
                f"{r.generator_replicas} replica(s))")
    apps: dict[str, list[str]] = {}
    for model, (app, _) in deployments.items():
        apps.setdefault(app, []).append(model)
    parts = [f"generator deployment {app!r} (vllm, {r.generator_replicas} replica(s)) for "
             f"{', '.join(map(repr, models))}" for app, models in apps.items()]
    remote = [n for n in names if n not in deployments]
    if remote:
        parts.append(f"openai backend in every actor for {', '.join(map(repr, remote))} "
                     f"({len(remote)} model{'s' if len(remote) > 1 else ''})")
    return "; ".join(parts)


def _import_ray_data() -> None:
    try:
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ClusterError(f"Ray Data is not installed ({e}); install it with {INSTALL_HINT}") from None
