# `make test` and `make demo` work from a bare Python: they create .venv when
# it is missing and install what they need into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench compare lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,examples]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pyright --pythonpath $(BIN)/python
	$(BIN)/python -m pytest -n auto --dist loadfile

demo: $(STAMP)
	$(BIN)/python examples/digits.py

# Benchmarks compare against Equinox and Flax NNX: installed only here.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/overhead.py

# One linear model in Flax Linen, Flax NNX, Equinox, Penzai and toylib.
compare: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[compare]"
	$(BIN)/python examples/compare/run_all.py

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache .hypothesis
