# Two commands that work on a fresh machine (Python >= 3.11 with venv):
#   make serve   set up .venv and run the server on the embedded offline defaults
#   make test    set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PARLEY := $(VENV)/bin/parley

.PHONY: setup serve test call clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

serve: setup
	$(PARLEY) serve

test: setup
	$(PY) -m pytest -q

# A simulated ACS call against an in-process server: make call WAV=my.wav
call: setup
	$(PARLEY) call $(WAV)

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
