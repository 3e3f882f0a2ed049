# memfl — the two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install data demo lint test test-all bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "memfl needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

## install: a virtual environment in .venv with memfl, torch==2.13.0 and the dev tools
install: $(STAMP)

## data: Fashion-MNIST from the Debian package where apt is available, else a download
data: $(STAMP)
	@bash scripts/get-data.sh $(BIN)/python

## demo: what memfl is for: memfl vs exclusive vs fedavg on the memory-wall regime, 40 rounds
## (~5 min on 2 cores): a table and results/demo/demo.png (accuracy vs virtual time, participation)
demo: install data
	$(BIN)/memfl demo --out results/demo

# pytest-xdist on the 2 cores; loadfile keeps each test file on one worker, so module-scoped
# fixtures (tests/test_flower.py's shared SuperLink) start once
XDIST ?= -n 2 --dist loadfile

## lint: import-linter layer contracts ([tool.importlinter]), ruff lint and format check of the project ([tool.ruff])
lint: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check
	$(BIN)/ruff format --check

## test: lint + the fast test suite, on 2 workers (what CI runs)
test: lint
	-@bash scripts/get-data.sh $(BIN)/python --quiet
	$(BIN)/python -m pytest -m "not slow" -q $(XDIST)

## test-all: every test, the slow ones too
test-all: install
	$(BIN)/python -m pytest -q $(XDIST)

## bench: every benchmark, results under results/bench
bench: install data
	for b in memory overhead fedavg scalefl hybrid flower faults executor memory-wall; do $(BIN)/memfl bench $$b --out results/bench || exit 1; done

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache .import_linter_cache
