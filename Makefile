# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv when absent.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test bench clean

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
