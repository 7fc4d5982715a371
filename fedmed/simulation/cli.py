"""``fedmed-sim``: a whole federation simulated on this machine."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]

_PENDING = "not available yet: it arrives with the federation work (issue #6)"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments; until issue #6 lands, say so and exit 2."""
    parser = argparse.ArgumentParser(
        prog="fedmed-sim", description=f"a whole federation simulated on this machine. {_PENDING}."
    )
    parser.parse_args(argv)
    print(f"fedmed-sim: {_PENDING}", file=sys.stderr)
    return 2
