# Two commands matter: `make demo` (the main job on the embedded default) and `make test` (the whole suite).
# Both create .venv if missing and install what they need; nothing else must be installed by hand.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test bench gpu-check lint clean

venv: $(STAMP)

# Reinstall whenever the requirements or the package metadata change.
$(STAMP): requirements.txt setup.py package.xml
	@# Debian's KJV text for the text benchmark and its corpus test (best effort: root + apt only; else they skip).
	command -v bible >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && apt-get install -y -qq bible-kjv) >/dev/null 2>&1; } || true
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@# (pip's noise about this machine's local index folders is filtered; pipefail keeps pip's exit status)
	$(BIN)/pip install -q --disable-pip-version-check --no-cache-dir -r requirements.txt 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -c "import torch, transformers, rclpy, rosbags, infmllm_ros"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m infmllm_ros.ros.demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q test

bench: $(STAMP)
	$(BIN)/infmllm-bench all --out docs/bench --report docs/BENCHMARKS.md

# The GPU measurements (kernels vs references in fp32/bf16/fp16, a 1M-token stream on a 7B-wide random model,
# decode step vs HBM bound) as one script, under 8 minutes on one GPU; without CUDA it says so and exits 0.
gpu-check: $(STAMP)
	$(BIN)/python -m infmllm_ros.bench.gpu_check $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build install log .pytest_cache
