"""``RemoteShardedIndex``: an ingress replica's view of a sharded index held by shard actors.

It is ``retrieval.sharded.ShardedIndex`` with another fan-out: the search, the merge of the
shards' top-k (``merge_top_k``: by score, ties by global id) and the exhaustive second pass
for short rows are that class's own, so the answers are the in-process sharded index's,
which for flat shards are one flat index's. Only ``_fan_out`` differs: one Ray actor call
per shard group, all sent before any is awaited, to one copy of each group (round robin
over the copies that answer).

Faults, per group:

- A call that fails because its copy died (``RayActorError``) or did not answer within
  ``ray.shard_timeout_s`` is sent again to another copy at once: with ``ray.shard_replicas``
  >= 2 a killed actor fails no request. The failed copy is left out until it answers a
  ping again (a prober thread pings every copy every ``PROBE_S``; Ray restarts a crashed
  copy, the supervisor replaces one that is gone for good, and the prober fetches the
  new handle from the supervisor). A copy that is only slow to answer a ping is left out
  only while another copy of its group is in.
- When no copy of a group answers, the search raises ``ShardUnavailableError`` naming its
  shards (HTTP 503 with ``Retry-After``): never the other shards' top-k as if whole.
  With ``ray.allow_partial`` it answers from the groups that answered instead, and
  ``search_marked`` names the missing shards: the retriever's ``Sources`` carry them to
  the ``QueryResult`` (``missing_shards``), which is then never cached. A search that no
  group answers is the 503 either way.

The search runs on the retriever's executor thread (``retrieval/retriever.py``), so the
blocking ``ray.get`` here never holds an event loop.

**Usage:** ``RAG.from_index(index, cfg, shards=shard_opener(supervisor_handle, cfg))``
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ragserve.errors import ShardUnavailableError
from ragserve.retrieval.sharded import ShardedIndex
from ragserve.types import Hit

log = logging.getLogger("ragserve.server")

PROBE_S = 0.5
"""How often every copy of every shard group is pinged (and how long a ping may take)."""


@dataclass(frozen=True)
class _Shape:
    """What ``ShardedIndex`` reads of a shard it does not hold."""

    ntotal: int
    dim: int
    spec: Any
    index_type: str
    search_params: dict[str, int]


class _Group:
    """The copies of one group of shards, and which of them answer."""

    def __init__(self, names: list[str], actors: list[Any]) -> None:
        self.names = list(names)
        self.actors = list(actors)
        self.up = set(range(len(actors)))
        self.down_at: dict[int, float] = {}
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def pick(self, tried: set[int]) -> int | None:
        """The next copy that answers and was not tried for this call (round robin)."""
        with self._lock:
            candidates = sorted(self.up - tried)
            if not candidates:
                return None
            return candidates[next(self._turn) % len(candidates)]

    def down(self, r: int, why: BaseException) -> None:
        with self._lock:
            if r in self.up:
                self.up.discard(r)
                self.down_at[r] = time.monotonic()
                log.warning("shard actor copy %d of %s left out: %s", r, ", ".join(self.names),
                            f"{type(why).__name__}: {str(why)[:200]}")

    def others_up(self, r: int) -> bool:
        with self._lock:
            return bool(self.up - {r})

    def back(self, r: int) -> None:
        with self._lock:
            if r not in self.up:
                self.up.add(r)
                since = self.down_at.pop(r, time.monotonic())
                log.warning("shard actor copy %d of %s answers again after %.1f s", r, ", ".join(self.names),
                            time.monotonic() - since)


class RemoteShardedIndex(ShardedIndex):
    """A ``VectorIndex`` over a sharded index whose shards are searched by shard actors.
    ``table``: the supervisor's ``table(folder)`` (groups of shard names and their copies'
    actor handles); ``supervisor``: its handle, asked again for a copy gone for good."""

    def __init__(self, top: Any, table: dict[str, Any], supervisor: Any, *, timeout_s: float,
                 allow_partial: bool = False) -> None:
        from ragserve.index.shards import shard_entries
        from ragserve.retrieval.index_spec import IndexSpec

        self.folder = table["folder"]
        self.groups = [_Group(g["shards"], g["actors"]) for g in table["groups"]]
        entries = shard_entries(top)
        if [n for g in self.groups for n in g.names] != [e.name for e in entries]:
            raise ShardUnavailableError(top.folder, [e.name for e in entries],
                                        "the shard actors hold other shards than the index lists")
        spec = IndexSpec.from_manifest(top.data["index"])
        params = table.get("search_params") or {}
        shapes = [_Shape(e.chunks, top.dim, spec, spec.index_type, params) for e in entries]
        super().__init__(shapes, threads=1)
        self.names = [e.name for e in entries]
        self.path = top.folder
        self.allow_partial = allow_partial
        self._first = np.cumsum([0] + [len(g.names) for g in self.groups])
        """Each group's first shard position."""
        self.supervisor = supervisor
        self.timeout_s = timeout_s
        self.failovers = 0
        self._stop = threading.Event()
        self._prober = threading.Thread(target=self._probe_forever, name="ragserve-shard-probe", daemon=True)
        self._prober.start()

    # -- the fan-out -----------------------------------------------------------------

    def _fan_out(self, x: np.ndarray, k: int, *, fill: bool) -> tuple[list[list[list[Hit]]], set[int]]:
        """Per shard, per query: that shard's top-k (local ids), from one copy of each group;
        and (``allow_partial``) the positions of the shards no copy answered for."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        calls = []
        for group in self.groups:
            r = group.pick(set())
            calls.append((group, r, None if r is None else group.actors[r].search.remote(x, k, fill)))
        rows: list[list[list[Hit]]] = []
        missing: list[str] = []
        gone: set[int] = set()
        why = "no copy is up"
        for g, (group, r, ref) in enumerate(calls):
            tried = set() if r is None else {r}
            started = time.monotonic()
            got = None
            while ref is not None:
                try:
                    got = ray.get(ref, timeout=max(0.0, started + self.timeout_s - time.monotonic()))
                    break
                except (RayActorError, GetTimeoutError) as e:
                    if isinstance(e, GetTimeoutError):
                        with contextlib.suppress(Exception):  # a running sync actor task finishes
                            ray.cancel(ref)
                    why = f"{type(e).__name__} from copy {r}"
                    group.down(r, e)
                    r = group.pick(tried)
                    if r is None:
                        ref = None
                        break
                    self.failovers += 1
                    tried.add(r)
                    ref, started = group.actors[r].search.remote(x, k, fill), time.monotonic()
            if got is None:
                missing.extend(group.names)
                gone.update(range(self._first[g], self._first[g + 1]))
                rows.extend([[] for _ in range(len(x))] for _ in group.names)
                continue
            rows.extend([[Hit(i, s) for i, s in row] for row in shard] for shard in got)
        if missing and (not self.allow_partial or len(gone) == len(self.names)):
            raise ShardUnavailableError(self.path, missing, why)
        return rows, gone  # partial answers are counted per request (``Requests``, metrics)

    # -- copies coming back ------------------------------------------------------------

    def _probe_forever(self) -> None:
        while not self._stop.wait(PROBE_S):
            try:
                self.probe()
            except Exception as e:  # noqa: BLE001 - a probe round that failed is tried again
                log.debug("shard probe: %s: %s", type(e).__name__, e)

    def probe(self) -> None:
        """Ping every copy: one that answers is in, one that does not within ``PROBE_S``
        is out; one gone for good is looked up again in the supervisor's table."""
        import ray
        from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

        pings = [(g, r, a.ping.remote()) for g in self.groups for r, a in enumerate(g.actors)]
        gone = False
        deadline = time.monotonic() + PROBE_S
        for group, r, ref in pings:
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                group.back(r)
            except ActorDiedError as e:
                group.down(r, e)
                gone = True
            except RayActorError as e:
                group.down(r, e)
            except GetTimeoutError as e:
                # NOTE: slow is not dead (a busy node, or Ray restarting it: calls to it wait):
                # it is left out only while another copy of its group is in, so that a
                # loaded machine never turns a slow ping into a 503.
                if group.others_up(r):
                    group.down(r, e)
        if gone:
            self._refresh()

    def _refresh(self) -> None:
        """Take the supervisor's current handles for copies it replaced."""
        table = self.supervisor.table.remote(self.folder).result(timeout_s=max(self.timeout_s, 30.0))
        for group, fresh in zip(self.groups, table["groups"], strict=True):
            for r, actor in enumerate(fresh["actors"]):
                if actor != group.actors[r]:  # handles compare by actor id
                    group.actors[r] = actor  # it joins the round robin once a ping answers

    def close(self) -> None:
        self._stop.set()
        super().close()


def shard_opener(supervisor: Any, config: Any) -> Any:
    """A ``served.ShardOpener`` for an ingress replica: the supervisor's actors of the
    version being opened (started by the supervisor the first time), as one index."""

    def open_remote(top: Any, shards: list[Any], load: dict[str, int]) -> RemoteShardedIndex:
        from ragserve.ray.serve.shards import resolved

        table = supervisor.table.remote(resolved(top.folder)).result()
        return RemoteShardedIndex(top, table, supervisor, timeout_s=config.ray.shard_timeout_s,
                                  allow_partial=config.ray.allow_partial)

    return open_remote
