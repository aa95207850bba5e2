# The two commands: `make demo` and `make test`. Both set up everything they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-unit lint format bench bench-ordering chaos clean down

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml tests/node/package-lock.json
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "orderonce needs Python 3.11 or newer (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,embedded]'
	@# Node packages for the checks of docs/producers.md (skipped where there is no npm).
	@command -v npm >/dev/null && npm ci --prefix tests/node --no-audit --no-fund --silent \
		|| echo "no Node packages: tests/integration/test_node_producers.py will skip"
	@touch $@

demo: install
	$(BIN)/orderonce demo

test: install
	$(BIN)/pytest

test-unit: install
	$(BIN)/pytest tests/unit

bench: install
	$(BIN)/python -m bench.duplicate_check
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.ordering

# What per-order ordering costs, alone (also the last part of `make bench`).
bench-ordering: install
	$(BIN)/python -m bench.ordering

# 100,000 events under every fault of docs/guarantees.md; the JSON result lands in chaos-results/.
chaos: install
	@mkdir -p chaos-results
	$(BIN)/orderonce chaos --events $${CHAOS_EVENTS:-100000} --seed $${CHAOS_SEED:-1} \
		--out chaos-results/chaos-$${CHAOS_SEED:-1}.json

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

down: install
	$(BIN)/orderonce down

clean:
	rm -rf $(VENV) .orderonce .pytest_cache .mypy_cache .ruff_cache
