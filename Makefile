# `make demo` and `make test` set up .venv (torch pinned first) and run.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export PREFECT_RESULTS_LOCAL_STORAGE_PATH ?= $(CURDIR)/.prefect/results

.PHONY: venv demo test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(PY) scripts/make_demo_model.py build/demo-model
	$(VENV)/bin/flexgen generate --model build/demo-model --prompt-ids 5,6,7,8 11,12 --max-new-tokens 8 \
		--weights 0.5,0.3,0.2 --cache 0,1,0 --gpu-batch-size 2 --offload-dir build/offload
	$(VENV)/bin/flexgen bench --model build/demo-model --prompt-len 64 --gen-len 16 --gpu-batch-size 4 \
		--num-gpu-batches 2 --weights 0.2,0.8,0 --cache 0,1,0 --acts 0,1,0 --offload-dir build/offload

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q

clean:
	rm -rf build .prefect benchmark_output
