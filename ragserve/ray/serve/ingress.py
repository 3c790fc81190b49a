"""The ingress deployment: the FastAPI app of ``ragserve serve`` in a Ray Serve replica.

Each replica opens the index (verified against its manifest, memory-mapped), loads the
embedding model, keeps its own L1 and joins the shared L2 Redis; generation goes to the
generator deployment through ``client.RayGenerator`` (with ``[models]``: one per model, over
the deployment that serves it; ``app.generator_groups``). The HTTP layer is
``server.app.create_app`` as it is (routes, middleware, error mapping, metrics), attached
with ``@serve.ingress`` in its late-bound form: Serve calls ``__serve_build_asgi_app__``
once the constructor has opened the index.

Two headers differ from the single-process server, both because Serve's proxy is in
front: ``X-Ragserve-Replica`` names the replica that answered (its Serve replica id), and
``X-Request-Id`` is the proxy's, which it always appends to the response (it forwards the
client's id, or makes one and hands it to the app, so the app's own copy of the same id
is dropped here instead of being sent twice). ``/metrics`` and ``/v1/stats`` are the
answering replica's own; every replica's series also go to Ray's metrics export
(``metrics.py``), which Prometheus scrapes per node.

Hot reload: ``POST /admin/reload`` reaches the one replica the proxy routes it to, so every
replica also follows the index path by itself (``ray.follow_index_s``): when a build flips
it to a new version, each replica reloads within that many seconds (``follow_index``).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("ragserve.server")

REPLICA_HEADER = b"x-ragserve-replica"


def require_shared_l2(config: Any) -> None:
    """Refuse a config whose L2 the replicas would not share (``cluster.refuse_unshared_l2``):
    a service has an L2, so no Redis URL at all is refused too."""
    from ragserve.ray.cluster import refuse_unshared_l2

    refuse_unshared_l2(config, "ragserve serve --ray", "replica", l2_required=True)


def ingress_tokenizer(config: Any) -> Any:
    """The tokenizer of the prompt budget, in the ingress replica: the local model folder's
    (``generate.model``), or the servers' ``/tokenize`` with the openai backend and
    ``openai.tokenizer = "server"``."""
    if config.generate.backend == "openai" and config.openai.tokenizer == "server":
        from ragserve.generators.openai import OpenAIGenerator

        return OpenAIGenerator(config.generate, config.openai).tokenizer()
    from ragserve.generators.tokenizers import local_tokenizer

    return local_tokenizer(config.generate.model)


def tokenizer_key(config: Any) -> tuple[Any, ...]:
    """What ``ingress_tokenizer`` depends on: two models with the same key share one."""
    g, o = config.generate, config.openai
    if g.backend == "openai" and o.tokenizer == "server":  # a client of the servers: all of [openai]
        return ("server", *((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(vars(o).items())))
    return ("local", g.model)


async def model_generators(handles: dict[str, Any], config: Any) -> dict[str, Any]:
    """A ``client.RayGenerator`` per model over the handle of the generator deployment that
    serves it: ``""`` for the one ``[generate]`` model, else a name of ``[models]`` (named
    on every call). Waits until each deployment is up (its engine warm) and keeps its model
    name; models over one folder (or one set of servers) share a tokenizer. An ingress
    replica and each ``batch --ray`` actor (``ray/batch.py``) build theirs here."""
    from ragserve.ray.serve.client import RayGenerator

    gens: dict[str, Any] = {}
    tokenizers: dict[Any, Any] = {}
    for name, handle in handles.items():
        model_cfg = config.model_config(name) if name else config
        info = await handle.describe.remote(**({"model": name} if name else {}))
        key = tokenizer_key(model_cfg)
        if key not in tokenizers:
            tokenizers[key] = await asyncio.to_thread(ingress_tokenizer, model_cfg)
        gens[name] = RayGenerator(handle, info, tokenizers[key], probe_interval_s=config.ray.probe_interval_s,
                                  model=name)
    return gens


class IngressServer:
    """The deployment's class (``app.py`` wraps it with ``serve.ingress()`` and
    ``serve.deployment``). ``index``: a path every node can read (a shared volume, or the
    same path baked into every node's image); ``config``: ``RAGConfig.to_dict()``;
    ``generator``: the generator deployment's handle (Serve passes it for its ``.bind()``), or
    with ``[models]`` a dict of a handle per model name;
    ``shards``: the shard supervisor's handle when the index is sharded (``shards.py``): the
    replica then embeds and merges, and the shard actors search (``fanout.py``)."""

    async def __init__(self, index: str, config: dict[str, Any], generator: Any, shards: Any = None) -> None:
        from ray import serve

        from ragserve.config import RAGConfig
        from ragserve.rag import RAG
        from ragserve.ray.serve.metrics import RayMetrics
        from ragserve.server.auth import ApiKeys

        cfg = RAGConfig().replace(**config)
        require_shared_l2(cfg)
        if not cfg.server.quota_redis_url:  # every replica draws on one bucket per tenant
            cfg = cfg.replace(server={"quota_redis_url": cfg.cache.redis_url})
        self.config = cfg
        self.replica = serve.get_replica_context().replica_id.unique_id
        gens = await model_generators(generator if isinstance(generator, dict) else {"": generator}, cfg)
        gen = gens.pop("", None)
        s = cfg.server
        self.keys = ApiKeys.load(s.api_keys_file) if s.api_keys_file else None
        # NOTE: off the replica's loop: opening verifies the index (hashing) and loads the
        # embedding model, and Serve's own calls to this replica should not wait on it.
        opener = None
        if shards is not None:
            from ragserve.ray.serve.fanout import shard_opener

            opener = shard_opener(shards, cfg)
        self.rag = await asyncio.to_thread(RAG.from_index, index, cfg, generator=gen, shards=opener,
                                           generators=gens or None)
        self.rag.observers.add(RayMetrics())  # every replica's series in Ray's metrics export
        log.info("ingress replica %s serves %s (fingerprint %s) with %s", self.replica, index,
                 self.rag.fingerprint[:16], gen.model_name if gen is not None else ", ".join(gens))
        self._follower = None
        if cfg.ray.follow_index_s:
            self._follower = asyncio.get_running_loop().create_task(
                follow_index(self.rag, index, cfg.ray.follow_index_s))

    def __serve_build_asgi_app__(self) -> Any:
        from ragserve.server.app import create_app

        # MCP without sessions: the proxy sends a client's next request to any replica
        app = create_app(self.rag, self.config.replace(server={"mcp_stateless": True}), keys=self.keys)
        app.add_middleware(BehindServeProxy, replica=self.replica)
        return app

    async def __del__(self) -> None:
        """Serve calls this when it stops the replica (after its requests have drained):
        cancel what is left, flush cache writes, release the index."""
        follower = getattr(self, "_follower", None)
        if follower is not None:
            follower.cancel()
        rag, self.rag = getattr(self, "rag", None), None
        if rag is not None:
            await asyncio.to_thread(rag.close)


async def follow_index(rag: Any, index: str, every_s: float) -> None:
    """Reload ``rag`` when ``index`` names another version than the one served (a build
    flips the path to its new version in one rename: ``index/versions.py``). Reading the link is
    all a look costs; a version refused by ``rag.reload`` (corrupt, another embedding
    model) is logged once and not tried again, and the current one keeps serving."""
    from ragserve.index.versions import resolve_index

    refused: Path | None = None
    while True:
        await asyncio.sleep(every_s)
        try:
            target = resolve_index(index)
        except Exception as e:  # noqa: BLE001 - no complete version right now: keep serving, look again
            log.debug("index %s not resolvable now: %s", index, e)
            continue
        if target == rag.manifest.folder.resolve() or target == refused:
            continue
        try:
            result = await asyncio.to_thread(rag.reload)  # verifies off the loop; requests keep flowing
        except Exception as e:  # noqa: BLE001 - a refused version leaves the current one serving
            refused = target
            log.error("index %s: new version %s refused, still serving %s: %s", index, target.name,
                      rag.fingerprint[:16], e)
            continue
        log.warning("index %s: now serving %s (%s)", index, target.name, result.get("fingerprint", "")[:16])


class BehindServeProxy:
    """Pure ASGI: names the replica on every response and leaves ``X-Request-Id`` to the
    proxy (see the module docstring)."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self.replica = replica.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message["headers"] = [*headers, (REPLICA_HEADER, self.replica)]
            await send(message)

        await self.app(scope, receive, send_named)
