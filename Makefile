# Two commands on a fresh machine: `make demo` (set up, run the main job on the embedded default) and
# `make test` (set up, run the tests). Both are idempotent.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo

.PHONY: setup demo demo-lm test bench clean-run

setup:
	@VENV=$(VENV) scripts/setup.sh

demo: setup
	@$(VENV)/bin/klas run --run-dir $(RUN_DIR)
	@$(VENV)/bin/klas report $(RUN_DIR)

# The embedded language models (pydoc-llama on the Python docs): probes (tuned lenses) .. evaluation, ~10 min.
demo-lm: setup
	@$(VENV)/bin/klas run klas/configs/pydoc-llama.toml --run-dir runs/demo-lm

test: setup
	@echo "[test] running the test suite (Triton kernels under TRITON_INTERPRET=1, C++ extension required; one worker per core, up to 4, each test file in one worker)"
	@TRITON_INTERPRET=1 KLAS_REQUIRE_EXT=1 $(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile tests

bench: setup
	@$(PY) -m pytest -q benchmarks --benchmark-only

clean-run:
	rm -rf $(RUN_DIR)
