# nudiff: `make demo` runs the main job, `make test` runs the tests. Both set up .venv
# first (idempotent: it reinstalls only when this file, a pyproject or the constraints change).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PACKAGES := packages/nudiff-postproc packages/nudiff-diffusion packages/nudiff-structure packages/nudiff-histo packages/nudiff-seg
STAMP := $(VENV)/.nudiff-installed
# the CPU wheel of torch lies in /opt/wheels on this project's machines (PIP_FIND_LINKS
# says so too, but CI may not pass the variable on)
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PYTEST_ARGS ?=
# pytest-xdist workers, each running whole test files with cores / workers threads (conftest.py), in
# collection order (tests/ first: the longest files start first; xdist would otherwise sort by test count);
# on 2 cores 12.8 min of pytest against 25.3 min in one process (AVX2 host); TEST_WORKERS=0 runs serially
TEST_WORKERS ?= 2
# where `make wheels` puts the wheels and sdists (tests/test_wheels.py passes its own)
DIST ?= dist

.PHONY: setup demo test bench lint wheels clean

setup: $(STAMP)

$(STAMP): Makefile constraints.txt $(foreach p,$(PACKAGES),$(p)/pyproject.toml)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# every local package in one pip call: their metadata name each other by name only
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(FIND_LINKS) -c constraints.txt \
		$(foreach p,$(PACKAGES),-e $(p)[test]) "ruff>=0.5" "build>=1.2" "matplotlib>=3.7" "pytest-xdist>=3.5"
	@touch $(STAMP)

# the main job: the whole method on configs/demo.toml (procedural tiles, or $$NUDIFF_DATA) -> demo_out/report.md
demo: $(STAMP)
	$(BIN)/python tools/pipeline.py configs/demo.toml

test: $(STAMP)
	$(BIN)/ruff check packages tools tests conftest.py
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python packages/nudiff-postproc/benchmarks/benchmark_postproc.py
	$(BIN)/python packages/nudiff-diffusion/benchmarks/benchmark_samplers.py
	$(BIN)/python packages/nudiff-diffusion/benchmarks/benchmark_unet.py
	$(BIN)/python packages/nudiff-histo/benchmarks/benchmark_histo.py
	$(BIN)/python packages/nudiff-seg/benchmarks/benchmark_features.py
	$(BIN)/python packages/nudiff-seg/benchmarks/benchmark_hovernet.py

lint: $(STAMP)
	$(BIN)/ruff check packages tools tests conftest.py

# a wheel and an sdist of every package in $(DIST)/, each package in its own isolated build
# environment (poetry-core from the index); the wheel is built from the sdist, which proves the
# sdist complete. A rerun first removes that version's files, so each package has exactly one of each.
wheels: $(STAMP)
	@mkdir -p $(DIST)
	@set -e; for p in $(PACKAGES); do \
		name=$$(sed -n 's/^name = "\(.*\)"$$/\1/p' $$p/pyproject.toml | head -n 1 | tr - _); \
		version=$$(sed -n 's/^version = "\(.*\)"$$/\1/p' $$p/pyproject.toml | head -n 1); \
		rm -f $(DIST)/$$name-$$version-*.whl $(DIST)/$$name-$$version.tar.gz; \
		echo "building $$name $$version"; \
		$(BIN)/python -m build --quiet --outdir $(DIST) $$p; \
	done
	@ls -l $(DIST)

clean:
	rm -rf $(VENV) demo_out bench_out dist .pytest_cache .hypothesis
