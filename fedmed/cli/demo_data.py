"""``fedmed demo-data OUT``: write a demo federation of chest-CT-like phantoms.

``OUT/site-A``, ``OUT/site-B``, ... in the Medical Segmentation Decathlon layout, one scanner
profile per site (see :mod:`fedmed.data.demo`), and ``OUT/holdout`` for the server. Progress
goes to stderr, one line per case; the written folders are listed on stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``demo-data`` subcommand."""
    parser = subparsers.add_parser(
        "demo-data",
        help="write demo site folders of synthetic chest CT with lesion labels",
        description="Write OUT/site-A, OUT/site-B, ... (MSD layout, one simulated scanner per "
        "site: noise, HU offset, spacing, field of view; site-C has noisy labels) and "
        "OUT/holdout. Deterministic for a given --seed.",
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="output folder")
    parser.add_argument("--sites", type=_positive, default=3, help="number of sites (3)")
    parser.add_argument("--cases", type=_positive, default=6, help="cases per site (6)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument(
        "--shape",
        type=_positive,
        nargs=3,
        default=None,
        metavar=("X", "Y", "Z"),
        help="voxels per volume (default 64 64 32; e.g. 512 512 100 for benchmarks)",
    )
    parser.add_argument(
        "--holdout",
        type=_non_negative,
        default=4,
        help="cases in OUT/holdout from a neutral scanner; 0 for none (4)",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from fedmed.data.demo import (
        DEFAULT_SHAPE,
        HOLDOUT_DIRNAME,
        generate_demo_federation,
        site_profile,
    )

    def on_case(site: str, done: int, total: int) -> None:
        print(f"{site}: case {done}/{total}", file=sys.stderr, flush=True)

    shape = tuple(args.shape) if args.shape else DEFAULT_SHAPE
    folders = generate_demo_federation(
        args.out,
        sites=args.sites,
        cases=args.cases,
        seed=args.seed,
        shape=shape,
        holdout=args.holdout,
        on_case=on_case,
    )
    for index, folder in enumerate(folders):
        print(f"wrote {folder} ({args.cases} cases; scanner {site_profile(index).name})")
    if args.holdout:
        print(f"wrote {args.out / HOLDOUT_DIRNAME} ({args.holdout} cases; held-out set)")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value
