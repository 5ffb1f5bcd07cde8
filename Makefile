# Set-up and entry points. `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned, from the CPU build on disk: a resolver left alone would pull CUDA.
TORCH := torch==2.13.0

.PHONY: setup lab-deps demo test bench clean

setup: lab-deps $(VENV)/.installed

# Debian packages and the compiled delay element of the WAN lab (needs root; fast when present).
lab-deps:
	./scripts/lab-deps.sh

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/fedrdma demo --json runs/demo/demo.json

# Two workers: most tests wait on real processes, heartbeats and deadlines, so two at once
# keep CI within its 20 minutes on two cores; the lab's tests share one worker (tests/conftest.py).
TEST_WORKERS ?= 2

# Layering and leftovers first (seconds), then the suite (minutes).
test: setup
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check fedrdma tests
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

bench: setup
	$(VENV)/bin/fedrdma bench transfer --size-mb 512 --modes grpc,rdma,rdma-e,rdma-e-pull --json results/transfer-512.json

clean:
	rm -rf $(VENV) .pytest_cache
