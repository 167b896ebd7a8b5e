# nudiff: `make demo` runs the main job, `make test` runs the tests. Both set up .venv
# first (idempotent: it reinstalls only when a pyproject or the constraints change).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PACKAGES := packages/nudiff-postproc packages/nudiff-diffusion packages/nudiff-structure packages/nudiff-histo packages/nudiff-seg
STAMP := $(VENV)/.nudiff-installed
# the CPU wheel of torch lies in /opt/wheels on this project's machines (PIP_FIND_LINKS
# says so too, but CI may not pass the variable on)
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PYTEST_ARGS ?=

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): constraints.txt $(foreach p,$(PACKAGES),$(p)/pyproject.toml)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# every local package in one pip call: their metadata name each other by name only
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(FIND_LINKS) -c constraints.txt \
		$(foreach p,$(PACKAGES),-e $(p)[test]) "ruff>=0.5"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python tools/demo.py

test: $(STAMP)
	$(BIN)/ruff check packages tools tests conftest.py
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python packages/nudiff-postproc/benchmarks/benchmark_postproc.py
	$(BIN)/python packages/nudiff-diffusion/benchmarks/benchmark_samplers.py
	$(BIN)/python packages/nudiff-diffusion/benchmarks/benchmark_unet.py
	$(BIN)/python packages/nudiff-histo/benchmarks/benchmark_histo.py
	$(BIN)/python packages/nudiff-seg/benchmarks/benchmark_features.py
	$(BIN)/python packages/nudiff-seg/benchmarks/benchmark_hovernet.py

lint: $(STAMP)
	$(BIN)/ruff check packages tools tests conftest.py

clean:
	rm -rf $(VENV) demo_out bench_out .pytest_cache .hypothesis
