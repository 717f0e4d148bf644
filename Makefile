# StockPilot Ops — the two commands: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Node.js clients the tests drive as outside programs would (tests/node/package.json).
NODE_DIR := tests/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed

.PHONY: install node promtool run test test-calendar test-fast check lint format typecheck bench demo clean lock

# A venv with the locked dependencies; re-run only when the lock or pyproject changes.
install: $(STAMP)
$(STAMP): requirements.lock pyproject.toml
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==0.13.8
	@$(BIN)/uv pip install --quiet --python $(BIN)/python -r requirements.lock
	@$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	@touch $(STAMP)

# The locked Node packages; needs Node.js and npm (Debian: apt-get install nodejs npm).
node: $(NODE_STAMP)
$(NODE_STAMP): $(NODE_DIR)/package-lock.json $(NODE_DIR)/package.json
	@command -v npm >/dev/null || { echo "make: npm not found: apt-get install nodejs npm" >&2; exit 1; }
	@npm ci --prefix $(NODE_DIR) --no-audit --no-fund --silent
	@touch $@

# promtool for the /metrics lint test (tests/gateway/test_promtool.py), from Debian's
# prometheus package into .tools/bin; without it that test skips locally and fails in CI.
promtool:
	@scripts/install-promtool.sh || echo "make: promtool not installed; the /metrics lint test will skip (fail in CI)" >&2

run: install
	$(BIN)/stockpilot up

check: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider -o addopts= tests/test_import_rules.py
	$(BIN)/python -m gateway.asyncapi --check docs/asyncapi.json

# Two workers, one test file each at a time (pytest-xdist, --dist loadfile: a file's module
# fixtures, such as one seeded nats-server, stay in one process). Most tests wait on real
# servers rather than compute, so two workers halve the wall time on 2 cores (measured:
# 8 min 38 s serial, 4 min 45 s with two, same 1,026 tests). Tests marked `alone` (the load
# test, which takes both cores) run afterwards with nothing beside them.
test: check node promtool
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not alone"
	$(BIN)/python -m pytest -m alone

# The suite with every test's clock a day back (tests/conftest.py CLOCK_DAYS_BACK): what a
# test bound to the calendar does at some hour of every day, at once. Not part of `make test`
# (it doubles the time); run it after changing a rule that reads the stream's stored time.
test-calendar: check node promtool
	STOCKPILOT_TEST_CLOCK_DAYS_BACK=1 $(BIN)/python -m pytest -n 2 --dist loadfile -m "not alone"

# The fast inner loop: the pure tests only (folds, decisions, queries, settings; no servers).
test-fast: install
	$(BIN)/python -m pytest -m "not servers" -q

bench: install
	$(BIN)/python -m bench

demo: install
	$(BIN)/stockpilot demo

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Re-pin after editing pyproject.toml.
lock: install
	$(BIN)/uv pip compile pyproject.toml --extra dev -o requirements.lock --python-version 3.11

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
