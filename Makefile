# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo

.PHONY: setup demo test bench clean

# torch==2.13.0 goes in first so the project's torch range is already satisfied (a CPU wheel here;
# on a GPU node install your CUDA build of torch first instead).
$(BIN)/seg: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/seg

setup: $(BIN)/seg

demo: setup
	$(BIN)/python -m seg.demo --output $(DEMO_DIR)

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache

# Build ./Dockerfile for real (rootful podman, against a local stand-in of its CUDA PyTorch base) and
# run seg --help / synth / fit / predict in the container as its non-root user; see docker/test.sh.
# Needs root; installs podman, runc and debootstrap from Debian if missing. Keeps its state in /tmp.
.PHONY: docker-test
docker-test:
	bash docker/test.sh
