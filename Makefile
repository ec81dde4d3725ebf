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
TOOLS := hf-fetch st-merge nx-shard tok-pack shard-verify ckpt-unshard
# The local Slurm scripts need root.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: all build install test test-rust test-compat lint fmt bench fuzz demo venv fixtures clean help \
	slurm slurm-down docs
	pretrain pretrain-8b pretrain-70b pretrain-405b fetch shards data sbatch pipeline-plan

help:
	@echo "make build     build every tool (release)"
	@echo "make install   cargo install every tool into ~/.cargo/bin"
	@echo "make test      every test: Rust unit/integration tests, compat tests against real torch/safetensors/transformers, lint"
	@echo "make bench     benchmarks; results go to BENCHMARKS.md"
	@echo "make fuzz      run the fuzz targets for a bounded time"
	@echo "make docs      man pages and shell completions of every tool into target/doc-gen/"
	@echo "make slurm     start a real single-node Slurm here (root); make slurm-down stops it"
	@echo "make demo      the whole pipeline on a tiny model, offline, in a few minutes"
	@echo "make pretrain-70b CORPUS=... the seed workflow for Llama 3 70B (also pretrain-8b, pretrain-405b;"
	@echo "               variables: MODEL WORK TP PP KV_MULT HW XSER DTYPE CORPUS BLOCK SUBMIT NODES)"

all: build

build:
	$(CARGO) build --release --workspace --bins --examples

install: docs
	for t in tools/*/; do $(CARGO) install --locked --path $$t; done
	@echo "man pages: target/doc-gen/man (copy to /usr/local/share/man/man1); completions: target/doc-gen/completions"

docs: build
	mkdir -p target/doc-gen/man target/doc-gen/completions/{bash,zsh,fish}
	for t in $(TOOLS); do \
	  $(BIN)/$$t --generate man > target/doc-gen/man/$$t.1 && \
	  $(BIN)/$$t --generate complete-bash > target/doc-gen/completions/bash/$$t && \
	  $(BIN)/$$t --generate complete-zsh > target/doc-gen/completions/zsh/_$$t && \
	  $(BIN)/$$t --generate complete-fish > target/doc-gen/completions/fish/$$t.fish || exit 1; \
	done

slurm:
	$(SUDO) bash scripts/slurm-up.sh

slurm-down:
	$(SUDO) bash scripts/slurm-down.sh

venv:
	bash scripts/setup-python.sh

fixtures: venv
	$(PY) scripts/gen_fixtures.py $(FIXTURES)/models
	bash scripts/fetch-tokenizer.sh $(FIXTURES)/tokenizer

test: lint test-rust test-compat

test-rust:
	$(CARGO) test --release --workspace

test-compat: venv fixtures build slurm
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

demo: venv fixtures build
	bash scripts/demo.sh $(ROOT)/demo-out

# ---------------------------------------------------------------------------------------------------------------
# The pipeline: Hub -> NxD shards + tokenized dataset -> verified -> sbatch script. File targets (stamps under
# $(WORK)/stamps), so `make` resumes where it stopped and `make -j2` downloads/shards and tokenizes at once.
# Presets set the seed layouts; every variable can still be overridden on the command line.
ifeq ($(PRESET),70b)
MODEL ?= meta-llama/Meta-Llama-3-70B
TP ?= 32
PP ?= 8
KV_MULT ?= 4
NODES ?= 16
else ifeq ($(PRESET),8b)
MODEL ?= meta-llama/Meta-Llama-3-8B
TP ?= 32
PP ?= 1
KV_MULT ?= 4
NODES ?= 1
else ifeq ($(PRESET),405b)
MODEL ?= meta-llama/Llama-3.1-405B
TP ?= 32
PP ?= 16
KV_MULT ?= 4
NODES ?= 32
endif
MODEL ?= meta-llama/Meta-Llama-3-70B
WORK ?= $(ROOT)/work
TP ?= 32
PP ?= 8
KV_MULT ?= 4
HW ?= trn1
XSER ?= 1
DTYPE ?= keep
CORPUS ?=
BLOCK ?= 8192
SUBMIT ?= 0
NODES ?= 16

NAME := $(notdir $(MODEL))
MODEL_DIR := $(WORK)/hf/$(NAME)
SHARD_DIR := $(WORK)/nxd/$(NAME)-tp$(TP)-pp$(PP)-kv$(KV_MULT)
DATA_DIR := $(WORK)/data/$(notdir $(basename $(firstword $(CORPUS))))-$(BLOCK)
SBATCH_FILE := $(WORK)/pretrain-$(NAME)-tp$(TP)-pp$(PP).sbatch
STAMPS := $(WORK)/stamps
LAYOUT := --tp $(TP) --pp $(PP) --kv-size-multiplier $(KV_MULT) --qkv-linear --fuse-qkv --hw-backend $(HW) \
	--xser $(XSER)

pretrain-8b pretrain-70b pretrain-405b:
	$(MAKE) pretrain PRESET=$(@:pretrain-%=%)

pretrain: $(SBATCH_FILE)
	@if [ "$(SUBMIT)" = 1 ] && command -v sbatch >/dev/null; then \
	  echo "sbatch $(SBATCH_FILE)"; sbatch $(SBATCH_FILE); \
	else \
	  echo; echo "Ready. Submit the training job with:  sbatch $(SBATCH_FILE)"; \
	  echo "(or rerun with SUBMIT=1 on a host with Slurm)"; \
	fi

# What would be written, from the model's config alone (no weights needed once config.json is there).
pipeline-plan: $(STAMPS)/fetch-$(NAME)
	$(BIN)/nx-shard --config $(MODEL_DIR)/config.json $(LAYOUT) --dry-run

fetch: $(STAMPS)/fetch-$(NAME)
shards: $(STAMPS)/shards-$(notdir $(SHARD_DIR))
data: $(STAMPS)/data-$(notdir $(DATA_DIR))
sbatch: $(SBATCH_FILE)

$(STAMPS)/fetch-$(NAME): | build
	@[ -n "$$HF_TOKEN" ] || [ -s "$${HF_HOME:-$$HOME/.cache/huggingface}/token" ] || [ -n "$$HF_ENDPOINT" ] || \
	  echo "note: no HF_TOKEN and no token file: gated repos (all meta-llama ones) will be refused" >&2
	$(BIN)/hf-fetch $(MODEL) --local-dir $(MODEL_DIR) --manifest $(MODEL_DIR).manifest.jsonl
	$(BIN)/shard-verify $(MODEL_DIR) --manifest $(MODEL_DIR).manifest.jsonl -q
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/shards-$(notdir $(SHARD_DIR)): $(STAMPS)/fetch-$(NAME)
	$(BIN)/nx-shard --input $(MODEL_DIR) --output $(SHARD_DIR) $(LAYOUT) --dtype $(DTYPE)
	$(BIN)/shard-verify $(SHARD_DIR) $(LAYOUT) --config $(MODEL_DIR)/config.json \
	  --manifest $(SHARD_DIR)/nx-shard.manifest.jsonl
	@touch $@

$(STAMPS)/data-$(notdir $(DATA_DIR)): $(STAMPS)/fetch-$(NAME)
	@[ -n "$(CORPUS)" ] || { echo "make: set CORPUS to the training text (jsonl/parquet/csv/txt files, dirs or globs)," \
	  "e.g. CORPUS=wikicorpus.parquet" >&2; exit 2; }
	$(BIN)/tok-pack --tokenizer $(MODEL_DIR) --input $(CORPUS) --output $(DATA_DIR) --block-size $(BLOCK) \
	  --compat nxd --manifest $(DATA_DIR).manifest.jsonl
	$(BIN)/shard-verify $(DATA_DIR) --block-size $(BLOCK) --config $(MODEL_DIR)/config.json \
	  --manifest $(DATA_DIR).manifest.jsonl
	@touch $@

$(SBATCH_FILE): $(STAMPS)/shards-$(notdir $(SHARD_DIR)) $(STAMPS)/data-$(notdir $(DATA_DIR))
	bash scripts/write-pretrain-sbatch.sh --model-dir $(MODEL_DIR) --shards $(SHARD_DIR) --data $(DATA_DIR) \
	  --out $@ --tp $(TP) --pp $(PP) --kv-multiplier $(KV_MULT) --xser $(XSER) --seq-len $(BLOCK) \
	  --nodes $(NODES) --force

clean:
	rm -rf target $(FIXTURES) bench-out
