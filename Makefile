# ldiffusion developer commands. `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP_OPTS ?= --disable-pip-version-check

.PHONY: demo test test-slow lint venv clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_OPTS) -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install $(PIP_OPTS) -q -c constraints.txt -e ".[dev,slides,dask,plot,view]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m ldiffusion.demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf demo_out .pytest_cache
