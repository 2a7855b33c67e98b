# enat: `make demo` runs the end-to-end demo, `make test` runs every test.
# Both create .venv on first use; reinstalling is skipped until the dependency spec changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SPEC_HASH := $(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(SPEC_HASH)
PYTEST_ARGS ?=

.PHONY: install demo test bench bench-gpu lint clean-state

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[text,dev]"
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(VENV)/bin/enat demo

# pytest exits 5 when it collects nothing: that is a broken suite, so say so and fail.
test: $(STAMP)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

bench: $(STAMP)
	$(PY) bench/run_all.py

# One GPU, < 8 min, one JSON: bench/results-gpu.json (BENCH_GPU_ARGS="--tiny --device cpu" checks the paths).
BENCH_GPU_ARGS ?=
bench-gpu: $(STAMP)
	$(PY) bench/gpu.py $(BENCH_GPU_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check models trainer pipelines cluster evaluation tests bench

clean-state:
	$(VENV)/bin/enat services down || true
	rm -rf .enat
