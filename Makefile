# make test / make demo create .venv when missing and install the pinned requirements into it.
# constraints.txt holds the one torch pin of every install: here it is installed as the CPU build
# (torch==<pin>+cpu, which no CUDA wheel can satisfy), GPU nodes take the same version from PyPI
# through environment.yml (docs/gpu.md). `make check-gpu-install` resolves that GPU install's pip
# part against PyPI (metadata only) and checks it against environment.yml's nvcc.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN := $(shell sed -n 's/^torch==\([^ ;\#]*\).*/\1/p' constraints.txt)
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test test-fast demo install clean check-gpu-install

install: $(STAMP)

$(STAMP): requirements.txt constraints.txt
	test -n "$(TORCH_PIN)" || { echo "constraints.txt has no torch==VERSION line" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt "torch==$(TORCH_PIN)+cpu"
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m demo.run_demo $(if $(SEED),--seed $(SEED))

check-gpu-install: $(STAMP)
	$(PY) scripts/check_gpu_install.py

clean:
	rm -rf demo_output .pytest_cache
