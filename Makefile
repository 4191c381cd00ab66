# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv when absent.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

# The main job on a fresh machine: install the core (no torch), convert the embedded demo model
# (a small GPT-2 trained on the Python standard library, engine/demo/), generate from it.
DEMO_PROMPT ?= def fib(n):
GPTCPU_HOME ?= $(HOME)/.cache/gptcpu
export GPTCPU_HOME

$(VENV)/.core-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

demo: $(VENV)/.core-installed
	$(VENV)/bin/gptcpu convert engine/demo --dtype f32 --out $(GPTCPU_HOME)/models/demo-f32 --force --quiet
	$(VENV)/bin/gptcpu generate --seed 0 --max-new-tokens 200 --verbose "$(DEMO_PROMPT)"

$(VENV)/.test-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

test: $(VENV)/.test-installed
	$(PY) -m pytest -q tests

# Never run two benchmarks at once on a 2-core machine.
bench: $(VENV)/.test-installed
	$(PY) -m gptcpu.bench.speed --shape gpt2
	$(PY) -m gptcpu.bench.convert_memory --layers 4 --dtype f16 | tee bench/results/convert-memory.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
