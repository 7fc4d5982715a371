"""``fedmed-server``: the central side (Flower SuperLink + the fedmed server app)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]

_PENDING = "not available yet: it arrives with the federation work (issue #4)"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments; until issue #4 lands, say so and exit 2."""
    parser = argparse.ArgumentParser(
        prog="fedmed-server",
        description=f"the central side (Flower SuperLink + the fedmed server app). {_PENDING}.",
    )
    parser.parse_args(argv)
    print(f"fedmed-server: {_PENDING}", file=sys.stderr)
    return 2
