"""Shard actors: the vectors of a sharded index held in Ray actors, for ``serve --ray``.

A sharded index (``index/shards.py``) of N shards is served by ceil(N / ``ray.shards_per_actor``)
groups of ``ray.shard_replicas`` copies each. Every copy is a ``ShardActor``: it checks the
shards of its group (their files, structure and agreement with the top manifest), maps
them and answers ``search`` with each shard's own top-k. Every ingress replica fans a
query out to one copy of every group and merges (``fanout.py``), so the index is held
once per copy, not once per ingress replica.

Who owns the actors: ``ShardSupervisor``, a one-replica Serve deployment of the
application (``RagserveShards``). Ray ties an actor's life to its owner's, so the actors
go when the application is deleted, and Serve's replacement of a failed supervisor
starts a new set. The supervisor:

- starts the copies of a version folder the first time an ingress replica asks for it
  (``table``), waits until every copy has loaded, and keeps the current and the previous
  version (a reload flips every shard at once; requests still on the old version finish
  on it);
- replaces a copy that is gone for good (killed with ``no_restart``, or its owner's
  restart budget spent) within ``CHECK_S``; a copy whose process crashed is restarted by Ray
  itself (``max_restarts=-1``): calls made meanwhile wait for it, or for ``ray.shard_timeout_s``.

**Usage:** ``app.py`` adds the supervisor when the index is sharded; an ingress replica
opens it with ``fanout.shard_opener(handle, config)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("ragserve.server")

CHECK_S = 1.0
"""How often the supervisor looks for copies that are gone for good."""
KEEP_VERSIONS = 2
"""Versions whose actors the supervisor keeps: the current one and the one before it."""


def groups_of(names: list[str], per_actor: int) -> list[list[str]]:
    """The shards each actor group holds: consecutive runs of ``per_actor``."""
    return [names[i:i + per_actor] for i in range(0, len(names), per_actor)]


class ShardActor:
    """One copy of one group of shards (a Ray actor; ``ray.remote`` is applied where it is
    started, so this module imports no Ray)."""

    def __init__(self, folder: str, names: list[str], load: dict[str, int]) -> None:
        from ragserve.engine.served import open_shard
        from ragserve.index.manifest import read_manifest
        from ragserve.index.shards import shard_entries
        from ragserve.index.verify import check_one_shard

        top = read_manifest(folder)
        entries = {e.name: e for e in shard_entries(top)}
        self.names = list(names)
        self.fingerprint = top.fingerprint
        self.shards = []
        for name in names:
            checked = check_one_shard(top, entries[name], "none")
            self.shards.append(open_shard(top, entries[name], checked.manifest, load))
        self.started = time.time()

    def search(self, queries: Any, k: int, fill: bool) -> list[list[list[tuple[int, float]]]]:
        """Per shard of the group, per query: its top-k as (local id, score), best first
        (``FaissIndex.search``'s contract; plain tuples pickle faster than ``Hit``s)."""
        return [[[(h.chunk_id, h.score) for h in row] for row in shard.search(queries, k, fill=fill)]
                for shard in self.shards]

    def describe(self) -> dict[str, Any]:
        return {"shards": self.names, "fingerprint": self.fingerprint, "pid": os.getpid(),
                "node": socket.gethostname(), "started": self.started,
                "search_params": self.shards[0].search_params}

    def ping(self) -> int:
        return os.getpid()


class _Version:
    """The actors of one version folder: ``groups[g][r]`` is copy r of group g."""

    def __init__(self, folder: str, names: list[list[str]], groups: list[list[Any]]) -> None:
        self.folder, self.names, self.groups = folder, names, groups
        self.replaced = 0
        self.search_params: dict[str, int] = {}

    def table(self) -> dict[str, Any]:
        return {"folder": self.folder, "search_params": self.search_params,
                "groups": [{"shards": n, "actors": list(a)}
                           for n, a in zip(self.names, self.groups, strict=True)]}

    def kill(self) -> None:
        import ray

        for copies in self.groups:
            for actor in copies:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)


class ShardSupervisor:
    """The ``RagserveShards`` deployment's class (``app.py``). ``config``: ``RAGConfig.to_dict()``."""

    async def __init__(self, config: dict[str, Any]) -> None:
        from ragserve.config import RAGConfig

        cfg = RAGConfig().replace(**config)
        self.ray = cfg.ray
        self.load = {"nprobe": cfg.index.ivf_nprobe, "ef_search": cfg.index.hnsw_ef_search}
        self.versions: dict[str, _Version] = {}
        self._lock = asyncio.Lock()
        self._checker = asyncio.get_running_loop().create_task(self._replace_forever())

    def _start(self, folder: str, names: list[str]) -> Any:
        import ray

        options = {"num_cpus": self.ray.shard_num_cpus, "max_restarts": -1, "max_task_retries": 0,
                   # copies of one group on different nodes where there are several
                   "scheduling_strategy": "SPREAD"}
        return ray.remote(ShardActor).options(**options).remote(folder, names, self.load)

    async def table(self, folder: str) -> dict[str, Any]:
        """The actors of version ``folder`` (a resolved version folder of a sharded index),
        started and loaded the first time it is asked for. Raises ``ShardUnavailableError``
        naming the shards whose copies could not load."""
        async with self._lock:
            version = self.versions.get(folder)
            if version is None:
                version = await self._start_version(folder)
                self.versions[folder] = version
                while len(self.versions) > KEEP_VERSIONS:
                    oldest = next(iter(self.versions))
                    self.versions.pop(oldest).kill()
            return version.table()

    async def _start_version(self, folder: str) -> _Version:
        from ragserve.errors import ShardUnavailableError
        from ragserve.index.manifest import read_manifest
        from ragserve.index.shards import shard_entries

        top = read_manifest(folder)
        names = groups_of([e.name for e in shard_entries(top)], self.ray.shards_per_actor)
        t0 = time.monotonic()
        groups = [[self._start(folder, n) for _ in range(self.ray.shard_replicas)] for n in names]
        version = _Version(folder, names, groups)
        failed: list[str] = []
        why = ""
        for n, copies in zip(names, groups, strict=True):
            for actor in copies:
                try:
                    version.search_params = (await actor.describe.remote())["search_params"]
                except Exception as e:  # noqa: BLE001 - named in the error below
                    failed.extend(x for x in n if x not in failed)
                    why = why or f"{type(e).__name__}: {str(e)[:400]}"
        if failed:
            version.kill()
            raise ShardUnavailableError(folder, failed, f"their shard actors did not load: {why}")
        log.warning("shard actors of %s: %d group(s) x %d copies loaded in %.1f s", folder, len(names),
                    self.ray.shard_replicas, time.monotonic() - t0)
        return version

    async def _replace_forever(self) -> None:
        while True:
            await asyncio.sleep(CHECK_S)
            for version in list(self.versions.values()):
                await self._replace_gone(version)

    async def _replace_gone(self, version: _Version) -> None:
        """Start a new copy in the place of one that is gone for good (``ActorDiedError``);
        a copy Ray is restarting answers later and is left alone."""
        from ray.exceptions import ActorDiedError, GetTimeoutError

        for g, copies in enumerate(version.groups):
            for r, actor in enumerate(copies):
                try:
                    await asyncio.wait_for(actor.ping.remote(), timeout=CHECK_S)
                except ActorDiedError:
                    copies[r] = self._start(version.folder, version.names[g])
                    version.replaced += 1
                    log.warning("shard actor copy %d of %s was gone: replaced", r,
                                ", ".join(version.names[g]))
                except (asyncio.TimeoutError, GetTimeoutError):
                    pass  # restarting or busy: Ray brings it back
                except Exception as e:  # noqa: BLE001 - looked at again in CHECK_S
                    log.debug("shard actor ping: %s: %s", type(e).__name__, e)

    async def status(self) -> dict[str, Any]:
        return {"versions": [{"folder": v.folder, "groups": len(v.groups), "replaced": v.replaced}
                             for v in self.versions.values()]}

    async def __del__(self) -> None:
        checker = getattr(self, "_checker", None)
        if checker is not None:
            checker.cancel()
        for version in getattr(self, "versions", {}).values():
            version.kill()


def resolved(folder: Path) -> str:
    """The version folder a supervisor keys actors by."""
    return str(Path(folder).resolve())
