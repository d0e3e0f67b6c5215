# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs the project into it.
PYTHON ?= python3
VENV ?= .venv
# Installed only when the venv has no importable torch >= 2.9. On a GPU machine pick a build
# with e.g. `make demo TORCH_SPEC="torch==2.13.0" PIP_EXTRA="--index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0
PIP_EXTRA ?=
EXTRAS ?= dev
# The suite also runs the optional readers and the Hugging Face parity check.
TEST_EXTRAS ?= dev,transformers,sklearn,datasets
PYTEST_ARGS ?= -m "not slow"
BIN := $(VENV)/bin
STAMP := $(VENV)/.moesaic-installed-$(EXTRAS)
TEST_STAMP := $(VENV)/.moesaic-installed-$(TEST_EXTRAS)

.PHONY: setup demo test lint clean

$(VENV)/.moesaic-installed-%: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import sys, torch; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 9))" 2>/dev/null \
		|| $(BIN)/python -m pip install $(PIP_EXTRA) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[$*]"
	@touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/moesaic compete --preset quick

# pytest exits 5 when it collects no tests; that is not a failure of the suite.
test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

lint: $(TEST_STAMP)
	$(BIN)/ruff check moesaic tests && $(BIN)/ruff format --check moesaic tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
