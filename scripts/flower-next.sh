#!/usr/bin/env bash
# The newer Flower fedmed supports (fedmed/flower/version.py): build .venv142 beside .venv
# (flwr 1.42 and its own dependencies; torch, pytest and the rest borrowed from .venv) and run
# the contract test plus one federation on it: a real SuperLink, two SuperNodes and the
# pinned ClientApp wrapper over TLS on 127.0.0.1. Usage: scripts/flower-next.sh (after setup)
set -euo pipefail
cd "$(dirname "$0")/.."
FLWR_NEXT=${FEDMED_FLWR_NEXT:-1.42.0}
VENV=.venv142
site() { "$1" -c 'import site; print(site.getsitepackages()[0])'; }
if ! "$VENV/bin/python" -c "import flwr, sys; sys.exit(flwr.__version__ != '$FLWR_NEXT')" 2>/dev/null; then
    echo "flower-next: building $VENV with flwr $FLWR_NEXT"
    .venv/bin/python -m venv "$VENV"
    "$VENV/bin/python" -m pip --disable-pip-version-check -q install "flwr[simulation]==$FLWR_NEXT"
    echo "import site; site.addsitedir('$(site .venv/bin/python)')" \
        > "$(site "$VENV/bin/python")/zz_fedmed.pth"
fi
# every time, as scripts/setup.sh does: the package layout may have changed since the build
"$VENV/bin/python" -m pip --disable-pip-version-check -q install --no-deps -e .
"$VENV/bin/python" -c "import flwr; print('flower-next: flwr', flwr.__version__)"
export FLWR_TELEMETRY_ENABLED=0
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/flower/test_flower_contract.py \
    "tests/e2e/test_federation_cli.py::test_cli_federation_with_minimal_app_completes_two_rounds"
