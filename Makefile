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
	$(VENV)/bin/flexgen eval synthetic_reasoning:mode=pattern_match --max-eval-instances 100

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q

clean:
	rm -rf build .prefect benchmark_output
