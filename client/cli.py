"""``fedmed-client``: a hospital site (Flower SuperNode + the fedmed client app)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]

_PENDING = "not available yet: it arrives with the federation work (issue #4)"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments; until issue #4 lands, say so and exit 2."""
    parser = argparse.ArgumentParser(
        prog="fedmed-client",
        description=f"a hospital site (Flower SuperNode + the fedmed client app). {_PENDING}.",
    )
    parser.parse_args(argv)
    print(f"fedmed-client: {_PENDING}", file=sys.stderr)
    return 2
