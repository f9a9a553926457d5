# alloc-moe's single entry point. `make sweep` runs the main job, `make test` runs the tests; both do all
# set-up first (a torch 2.11.0 venv outside the checkout, reused when present; the libtorch link).
SHELL := /bin/bash
CACHE ?= $(or $(ALLOC_MOE_CACHE),$(HOME)/.cache/alloc-moe)
VENV := $(CACHE)/venv-torch-2.11.0
export ALLOC_MOE_CACHE := $(CACHE)
# torch-sys runs `python3` from PATH to find torch: put the venv first.
export PATH := $(VENV)/bin:$(PATH)
CARGO ?= cargo

.PHONY: setup test fuzz-smoke fuzz sweep gpu-build bench fmt clippy

setup:
	@bash scripts/setup-env.sh

## The main job: the budget sweep on the committed checkpoints (see README).
sweep: setup
	$(CARGO) run --release -p eval -- sweep $(ARGS)

## Every test: unit, property, golden (CPU, f32). GPU-only tests are #[ignore]d.
test: setup
	$(CARGO) test --workspace --all-targets
	$(CARGO) test --workspace --doc

## The fuzz smoke run alone (part of `make test` too): every committed corpus input and a few thousand
## seeded mutations through each fuzz target's entry function. No cargo-fuzz needed.
fuzz-smoke: setup
	$(CARGO) test --workspace --lib --bins fuzz_smoke

## Fuzz one target with cargo-fuzz (installed separately; docs/fuzzing.md): make fuzz T=config_json SECS=600.
## New inputs go to $(FUZZ_WORK)/$(T), not to the committed (minimised) corpus; scratch files to /dev/shm.
T ?= config_json
SECS ?= 600
FUZZ_WORK ?= /tmp/alloc-moe-fuzz
fuzz: setup
	mkdir -p $(FUZZ_WORK)/$(T)
	RUSTC_BOOTSTRAP=1 LD_LIBRARY_PATH=$(CURDIR)/libtorch/lib TMPDIR=/dev/shm \
		$(CARGO) fuzz run -s none -a $(T) $(FUZZ_WORK)/$(T) fuzz/corpus/$(T) -- -dict=fuzz/dicts/json.dict \
		-max_total_time=$(SECS) -rss_limit_mb=2048 -timeout=10 -max_len=8192

## A release build of eval for the GPU machine (keeps libtorch_cuda.so linked; see shared/GPU.md).
gpu-build: setup
	$(CARGO) build --release -p eval
	mkdir -p .carry && cp target/release/eval .carry/eval
	@readelf -d .carry/eval | grep -q libtorch_cuda.so && echo "gpu-build: .carry/eval links libtorch_cuda.so"

bench: setup
	$(CARGO) bench -p bench

fmt:
	$(CARGO) fmt --all

clippy: setup
	$(CARGO) clippy --workspace --all-targets
