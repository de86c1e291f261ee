# The two commands of the README: `make demo` (main job) and `make test` (the test suite, without
# the tests marked slow; `make test-slow` runs only those, and CI runs both).
# All create the virtual environment on first use; nothing else needs installing by hand.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,server]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

# pytest exits 5 when it collects no test: no slow test at all is not a failure.
test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow || [ $$? -eq 5 ]

test-all: $(VENV)/.installed
	$(PY) -m pytest -q -m ""

demo: $(VENV)/.installed
	$(VENV)/bin/veridical demo

# The vLLM backend's suite, in its own CPU environment (.venv-vllm, about 7 GB, built on first use
# by scripts/build-vllm-venv.sh in a few minutes): vLLM needs other builds of torch and torchvision.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed: scripts/build-vllm-venv.sh
	scripts/build-vllm-venv.sh $(VLLM_VENV)

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q -m "" tests/test_vllm_backend.py tests/test_vllm_pressure.py \
		tests/test_readme.py -k vllm

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

.PHONY: install test test-slow test-all test-vllm demo lint
