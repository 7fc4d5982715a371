# The README's two commands: `make demo` and `make test`. Both set up .venv first.
.PHONY: demo test setup setup-dev lint

export FLWR_TELEMETRY_ENABLED ?= 0
DEMO_DIR ?= demo

setup:
	scripts/setup.sh

setup-dev:
	scripts/setup.sh dev

demo: setup
	.venv/bin/fedmed demo-data $(DEMO_DIR)/data --sites 3 --cases 6 --seed 0
	.venv/bin/fedmed data check $(DEMO_DIR)/data/site-A
	.venv/bin/fedmed data check $(DEMO_DIR)/data/site-B
	.venv/bin/fedmed data check $(DEMO_DIR)/data/site-C

test: setup-dev
	.venv/bin/ruff check .
	.venv/bin/python -m pytest

lint: setup-dev
	.venv/bin/ruff check .
