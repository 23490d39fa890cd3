# Front door: `make demo` and `make test` work on a fresh machine with Python 3.11 and pip.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch and torchvision first, pinned to the builds this workplace serves from local files.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install bench clean docs docs-build

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev,serve]"
	# torchreid (a test oracle) declares no dependencies and must be installed without them
	$(BIN)/python -m pip install -q --no-deps torchreid==0.2.5
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/deepmetric quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the documentation site (mkdocs.yml, docs/): served at http://127.0.0.1:8000 as you edit, or built into site/
docs: $(STAMP)
	$(BIN)/mkdocs serve

docs-build: $(STAMP)
	$(BIN)/mkdocs build --strict

clean:
	rm -rf runs site .pytest_cache
