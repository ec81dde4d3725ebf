# The suite's entry points. `make test` is what CI runs (.ci/run); `make demo` runs the main job.
SHELL := /bin/bash
ROOT := $(abspath .)
VENV := $(ROOT)/.venv
PY := $(VENV)/current/bin/python
PY21 := $(VENV)/torch21/bin/python
PYDS3 := $(VENV)/datasets36/bin/python
FIXTURES := $(ROOT)/fixtures
BIN := $(ROOT)/target/release
CARGO ?= cargo

.PHONY: all build install test test-rust test-compat lint fmt bench fuzz demo venv fixtures clean help

help:
	@echo "make build     build every tool (release)"
	@echo "make install   cargo install every tool into ~/.cargo/bin"
	@echo "make test      every test: Rust unit/integration tests, compat tests against real torch/safetensors/transformers, lint"
	@echo "make bench     benchmarks; results go to BENCHMARKS.md"
	@echo "make fuzz      run the fuzz targets for a bounded time"
	@echo "make demo      the main job on an embedded default (not available yet: see README)"

all: build

build:
	$(CARGO) build --release --workspace --bins --examples

install:
	for t in tools/*/; do $(CARGO) install --locked --path $$t; done

venv:
	bash scripts/setup-python.sh

fixtures: venv
	$(PY) scripts/gen_fixtures.py $(FIXTURES)/models
	bash scripts/fetch-tokenizer.sh $(FIXTURES)/tokenizer

test: lint test-rust test-compat

test-rust:
	$(CARGO) test --release --workspace

test-compat: venv fixtures build
	FIXTURES=$(FIXTURES) BIN=$(BIN) PY21=$(PY21) PY_DATASETS3=$(PYDS3) $(PY) -m pytest -q tests/compat tests/reference

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

bench: build
	bash scripts/bench.sh

fuzz:
	bash scripts/fuzz.sh

demo:
	@echo "make demo: the pipeline (issue 9) is not built yet; see README.md for what works today" >&2
	@exit 2

clean:
	rm -rf target $(FIXTURES) bench-out
