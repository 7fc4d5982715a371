# The README's two commands: `make demo` and `make test`. Both set up .venv first.
.PHONY: demo test setup setup-dev lint

export FLWR_TELEMETRY_ENABLED ?= 0
DEMO_DIR ?= demo

setup:
	scripts/setup.sh

setup-dev:
	scripts/setup.sh dev

# The demo federation: generated chest CT at 3 sites (one with noisy labels), COPLE-Net, a few
# rounds on CPU, held-out Dice printed per round; report in $(DEMO_DIR)/report.md.
demo: setup
	.venv/bin/fedmed-sim --config configs/sim.toml --out $(DEMO_DIR)

test: setup-dev
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -n 4 --dist loadfile
	scripts/flower-next.sh

lint: setup-dev
	.venv/bin/ruff check .
