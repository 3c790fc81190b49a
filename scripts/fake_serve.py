"""``ragserve serve`` over STAND-IN models, to study the HTTP layer alone: its per-token cost
(``benchmarks/bench_sse.py``) and its memory in a soak (``benchmarks/soak.py --fake-generator``), without a vLLM
engine (on a 2-core machine, vLLM benchmarks need the cores to themselves).

NOT an answer server. The generator emits ``--tokens`` word pieces per answer, one per
``--step-ms`` on a clock shared by every running request, as vLLM's engine steps give every
running request its next token at once. With ``--embedder stand-in`` (the default) the
embedder hashes each text to a unit vector and claims the identity of the index's own model
(so a real index folder opens: real chunk texts, real FAISS search, meaningless
neighbours); ``--embedder real`` loads the configured embedding model (its memory and CPU
are part of what a soak watches). Everything else is the real server: ``serve_index`` with
its drain, cache tiers (embedded Redis), metrics and logs.

``--tracemalloc-after S``: trace Python allocations from the start, take a snapshot S
seconds in (the end of a warm-up) and write the top growth since then to
``--tracemalloc-out`` every ``--tracemalloc-every`` seconds and at exit (tracing slows the
server: use it to find where memory goes, not to time anything).

Run (what ``benchmarks/soak.py --fake-generator`` starts):

    python scripts/fake_serve.py indexes/xquad --port 0 --tokens 32 --step-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
WORDS = (" the", " answer", " is", ",", ' "quoted"', " naïve", "\n", " 42", " tokens", ".")
"""Pieces of a stand-in answer: quotes, a newline and non-ASCII keep the framing honest."""


class StandInEmbedder:
    """Text → a unit vector from its SHA-256; dimension and identity copied from the index."""

    def __init__(self, index: str | Path) -> None:
        built = json.loads((Path(index) / "manifest.json").read_text(encoding="utf-8"))["embedding"]
        self.dim = int(built["dim"])
        self.identity = {"name": built.get("name"), "identity": built.get("identity")}

    def warm_up(self) -> None:
        pass

    def encode(self, texts: list[str], *, batch_size: int | None = None) -> np.ndarray:
        out = np.empty((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(t.encode("utf-8", "surrogatepass")).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            out[i] = v / np.linalg.norm(v)
        return out


class WordTokenizer:
    """One token per whitespace-separated word (the prompt builder's needs only)."""

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        return "".join(f"<{m['role']}> {m['content']} </{m['role']}> " for m in messages) + "<assistant>"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return text.split()

    def decode(self, ids: list[str]) -> str:
        return " ".join(ids)


class PacedGenerator:
    """``tokens`` pieces per answer, one per engine step of ``step_s``; the steps are one
    clock for every request (all running requests get a piece in the same loop turn)."""

    model_name = "stand-in"

    def __init__(self, tokens: int = 64, step_s: float = 0.02) -> None:
        self.tokens = tokens
        self.step_s = step_s
        self.running = 0
        self.generated = 0

    def warm_up(self) -> None:
        pass

    def tokenizer(self) -> WordTokenizer:
        return WordTokenizer()

    async def generate(self, prompt: str, request_id: str, *, token_ids: list[int] | None = None) -> Any:
        gen = None
        async for piece in self.stream(prompt, request_id, token_ids=token_ids, deltas=False):
            gen = piece
        return gen

    async def stream(self, prompt: str, request_id: str, *, token_ids: list[int] | None = None,
                     deltas: bool = True) -> AsyncIterator[Any]:
        from ragserve.types import Generation, TokenUsage

        loop = asyncio.get_running_loop()
        self.running += 1
        pieces = []
        t0 = time.perf_counter()
        try:
            for i in range(self.tokens):
                if self.step_s > 0:
                    await asyncio.sleep(self.step_s - loop.time() % self.step_s)  # the next shared step
                piece = WORDS[(i + len(prompt)) % len(WORDS)]
                pieces.append(piece)
                self.generated += 1
                if deltas:
                    yield piece
            ms = (time.perf_counter() - t0) * 1e3
            yield Generation("".join(pieces), TokenUsage(len(prompt.split()), len(pieces)), "stop", 0.0,
                             ms / max(1, self.tokens), ms)
        finally:
            self.running -= 1

    def unfinished(self) -> int:
        return self.running

    def shutdown(self) -> None:
        pass


class AllocationTrace:
    """tracemalloc from start-up; growth since the snapshot taken ``after_s`` in, written to
    ``out`` every ``every_s`` seconds and at ``stop``."""

    def __init__(self, after_s: float, every_s: float, out: Path) -> None:
        import tracemalloc

        self.tm = tracemalloc
        self.after_s, self.every_s, self.out = after_s, every_s, out
        self.base: Any = None
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        tracemalloc.start(8)
        threading.Thread(target=self._run, name="fake-serve-tracemalloc", daemon=True).start()

    def _run(self) -> None:
        if self._stop.wait(self.after_s):
            return
        self.base = self.tm.take_snapshot()
        while not self._stop.wait(self.every_s):
            self.write()

    def write(self) -> None:
        if self.base is None:
            return
        import psutil

        now = self.tm.take_snapshot()
        stats = now.compare_to(self.base, "traceback")
        current, peak = self.tm.get_traced_memory()
        lines = [f"t={time.monotonic() - self.t0:.0f}s rss={psutil.Process().memory_info().rss / 2**20:.1f}MB "
                 f"traced={current / 2**20:.1f}MB (peak {peak / 2**20:.1f}MB); growth since t={self.after_s:g}s: "
                 f"{sum(s.size_diff for s in stats) / 2**20:+.2f}MB in {sum(s.count_diff for s in stats):+d} blocks"]
        for s in stats[:15]:
            lines.append(f"{s.size_diff / 1024:+9.1f} KiB {s.count_diff:+7d} blocks")
            lines += ["    " + line.strip() for line in s.traceback.format(limit=6)]
        with open(self.out, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n\n")

    def stop(self) -> None:
        self._stop.set()
        self.write()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("index", type=Path)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--grace", type=float, default=30.0)
    ap.add_argument("--ready-file", type=Path)
    ap.add_argument("--tokens", type=int, default=64, help="pieces per answer")
    ap.add_argument("--step-ms", type=float, default=20.0, help="one engine step: every running request's next piece")
    ap.add_argument("--embedder", choices=("stand-in", "real"), default="stand-in")
    ap.add_argument("--tracemalloc-after", type=float, help="seconds: snapshot here, report growth since")
    ap.add_argument("--tracemalloc-every", type=float, default=60.0)
    ap.add_argument("--tracemalloc-out", type=Path, default=Path("fake-serve-tracemalloc.txt"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from ragserve.config import RAGConfig
    from ragserve.server import serve_index

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    trace = (AllocationTrace(args.tracemalloc_after, args.tracemalloc_every, args.tracemalloc_out)
             if args.tracemalloc_after is not None else None)
    cfg = RAGConfig.load().replace(server={"host": args.host, "port": args.port, "drain_grace_s": args.grace})
    print(f"fake_serve: STAND-IN generator ({args.tokens} pieces per answer, one per {args.step_ms:g} ms step), "
          f"{args.embedder} embedder, over {args.index}", flush=True)
    try:
        serve_index(args.index, cfg, ready_file=args.ready_file,
                    embedder=StandInEmbedder(args.index) if args.embedder == "stand-in" else None,
                    generator=PacedGenerator(args.tokens, args.step_ms / 1e3))
    finally:
        if trace is not None:
            trace.stop()


if __name__ == "__main__":
    main()
