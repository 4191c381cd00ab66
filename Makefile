# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv when absent.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench bench-serve bench-ray compare clean wheelhouse docker docker-test

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

$(VENV)/.bench-installed: pyproject.toml $(VENV)/.test-installed
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

# The standard measurements, one after another (never two benchmarks at once on a 2-core
# machine), with NumPy's OpenBLAS left to pick its own kernels. Writes bench/results/.
BENCH_ENV := env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE
bench: $(VENV)/.bench-installed
	$(BENCH_ENV) $(PY) -m gptcpu.bench.speed --shape gpt2 --threads 2 --repeats 3
	$(BENCH_ENV) $(PY) -m gptcpu.bench.backends --models gpt2,gptj-4l --repeats 5 --matrix --plot bench/results/backends.png
	$(BENCH_ENV) $(PY) -m gptcpu.bench.eval_demo --threads 2
	$(PY) -m gptcpu.bench.convert_memory --layers 4 --dtype f16 | tee bench/results/convert-memory.json
	$(MAKE) compare

# gptcpu vs onnxruntime vs transformers (gptcpu bench) on the standard random models
COMPARE_MODELS ?= gpt2 gpt2-medium gptj-4l
COMPARE_REPEATS ?= 3
compare: $(VENV)/.bench-installed
	for m in $(COMPARE_MODELS); do \
	  $(BENCH_ENV) $(VENV)/bin/gptcpu bench $$m --threads 2 --repeats $(COMPARE_REPEATS) --markdown bench/results/compare-$$m.md \
	    --json bench/results/compare-$$m.json --plot bench/results/compare-$$m.png || exit 1; done

# Ray on this machine: serve replicas x threads, batch actors -> bench/results/ray.md
bench-ray: $(VENV)/.bench-installed
	$(BENCH_ENV) $(PY) -m gptcpu.bench.ray_bench --clients 8 --prompts 96 --repeats 2

# `gptcpu serve` under 1, 2, 4 and 8 concurrent streaming clients -> bench/results/serve.md
bench-serve: $(VENV)/.bench-installed
	$(BENCH_ENV) $(PY) -m gptcpu.bench.serve --shape gpt2 --threads 2 --clients 1,2,4,8 --repeats 5

# Docker: one image per BLAS backend, built from a wheelhouse (no network inside the build).
# Debian's client (/usr/bin/docker) builds with BuildKit by itself; another client on PATH may
# lack the buildx plugin that DOCKER_BUILDKIT=1 needs.
DOCKER ?= $(shell test -x /usr/bin/docker && echo /usr/bin/docker || echo docker)
docker/wheelhouse/.done: pyproject.toml $(VENV)/.core-installed
	rm -rf docker/wheelhouse
	$(PY) -m pip wheel --quiet --wheel-dir docker/wheelhouse '.[mkl]'
	touch $@

wheelhouse: docker/wheelhouse/.done

docker: wheelhouse
	docker/setup-engine.sh
	DOCKER_BUILDKIT=1 $(DOCKER) build -q -f docker/openblas.Dockerfile -t gptcpu:openblas .
	DOCKER_BUILDKIT=1 $(DOCKER) build -q -f docker/mkl.Dockerfile -t gptcpu:mkl .
	DOCKER_BUILDKIT=1 $(DOCKER) build -q -f docker/mkl.Dockerfile --build-arg THREADING=tbb -t gptcpu:mkl-tbb .
	$(DOCKER) images 'gptcpu:*'

# Builds the images and runs them (tests/test_docker.py); called by .ci/run. Where no Docker
# engine can be had, the tests skip with the reason they found.
docker-test: $(VENV)/.test-installed
	-docker/setup-engine.sh
	if $(DOCKER) info >/dev/null 2>&1; then $(MAKE) docker; fi
	GPTCPU_DOCKER_TEST=1 $(PY) -m pytest -q -rs tests/test_docker.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
