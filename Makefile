# make test   create .venv on first use, install the project and run the tests (CPU: Triton kernels
#             run under TRITON_INTERPRET=1)
# make bench  create .venv on first use, install, run the default benchmark suite
# make lint   ruff
#
# On a machine without an NVIDIA GPU the CPU build of torch is installed: TORCH_SPEC pins a version
# whose CPU wheel this machine's pip can find (set TORCH_INDEX to a CPU wheel index elsewhere);
# with a GPU, pip's default torch (a CUDA build) is used.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
HAS_GPU     := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC  ?= $(if $(HAS_GPU),torch,torch==2.13.0)
TORCH_INDEX ?=
PYTEST_ARGS ?=
BENCH_ARGS  ?=

.PHONY: test bench lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,lint,plot]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/fused-rnn-bench $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check fused_rnn kernels bench tests
	$(BIN)/ruff format --check fused_rnn kernels bench tests

clean:
	rm -rf $(VENV) build *.egg-info
