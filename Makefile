# A newcomer's two commands: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format clean bench bench-gpu bench-quality

install: $(STAMP)

# torch 2.14.1 / torchvision 0.29.1 come from the machine's local wheel files (no newer torch is allowed here).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sslvit.demo

test: $(STAMP)
	$(PY) -m pytest -q

# CPU benchmark set (< 10 min on 2 cores); each script prints one JSON object per measurement. See BENCHMARKS.md.
bench: $(STAMP)
	$(PY) benchmarks/throughput.py --suite cpu
	$(PY) benchmarks/pretrain_e2e.py --suite cpu
	$(PY) benchmarks/eval_speed.py --suite cpu

# Quality per compute (BENCHMARKS.md): each recipe pretrained for a wall-clock budget, then k-NN and linear probe
# against its random init. About 40 minutes on 2 cores; needs ../shared/data/cifar10. Run it on a quiet machine.
bench-quality: $(STAMP)
	$(PY) benchmarks/quality.py --recipe quickstart --data digits --steps 660 --json-out runs/quality/quality.jsonl
	$(PY) benchmarks/quality.py --recipe quickstart_dino --data digits --minutes 2 --json-out runs/quality/quality.jsonl
	$(PY) benchmarks/quality.py --recipe mae_vit_tiny_cifar --data cifar10 --minutes 15 --json-out runs/quality/quality.jsonl
	$(PY) benchmarks/quality.py --recipe dino_vit_tiny_cifar --data cifar10 --minutes 15 --json-out runs/quality/quality.jsonl

# GPU set: run on a machine with a CUDA device (say which card in BENCHMARKS.md).
bench-gpu: $(STAMP)
	$(PY) benchmarks/throughput.py --suite gpu
	$(PY) benchmarks/pretrain_e2e.py --suite gpu

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf runs .pytest_cache .ruff_cache
