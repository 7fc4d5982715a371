"""``fedmed data check DIR [DIR ...]``: report every problem in site data folders.

Prints one line per problem (``path: message``, file names with control characters escaped)
and a summary per folder (``site-A: 6 cases, 0 problems``); exits 0 only when every folder is
clean, otherwise with :class:`~fedmed.errors.DataError`'s exit code (4). ``--affine-tol``,
``--max-image-gib`` and ``--allow-external-links`` take the site config's values.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from fedmed.errors import DataError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``data`` subcommand and its ``check`` action."""
    parser = subparsers.add_parser("data", help="inspect site data folders")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check",
        help="report every problem in site data folders (exit 0 only when clean)",
        description="Check site data folders (Medical Segmentation Decathlon layout or "
        "*_img/*_seg pairs): readable NIfTI within the memory limit, one real-valued channel, "
        "a usable affine, label/image shape and affine, declared label values, no NaN/inf, "
        "dataset.json sound and its entries present inside the folder, no labels without "
        "images.",
    )
    check.add_argument("folders", nargs="+", type=Path, metavar="DIR", help="site data folder")
    check.add_argument(
        "--affine-tol",
        type=float,
        default=None,
        metavar="MM",
        help="largest allowed image/label affine difference in mm (default 1e-3)",
    )
    check.add_argument(
        "--max-image-gib",
        type=float,
        default=None,
        metavar="GIB",
        help="largest memory one image may need once read (default 2)",
    )
    check.add_argument(
        "--allow-external-links",
        action="store_true",
        help="follow symbolic links that point outside the folder",
    )
    check.add_argument(
        "--workers",
        type=_positive,
        default=min(4, os.cpu_count() or 1),
        metavar="N",
        help="check N cases at a time (threads; default min(4, CPUs))",
    )
    check.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    check.set_defaults(func=_run_check)


def _run_check(args: argparse.Namespace) -> int:
    from fedmed.io.check import DEFAULT_AFFINE_ATOL, check_site_folder
    from fedmed.io.guard import GuardSettings
    from fedmed.io.header import DEFAULT_MAX_IMAGE_BYTES
    from fedmed.io.msd import load_site_dataset
    from fedmed.text import printable

    gib = args.max_image_gib
    guard = GuardSettings(  # validates the flags
        label_affine_tolerance=DEFAULT_AFFINE_ATOL if args.affine_tol is None else args.affine_tol,
        max_image_bytes=DEFAULT_MAX_IMAGE_BYTES if gib is None else int(gib * 2**30),
        allow_external_links=args.allow_external_links,
    )
    progress = not args.no_progress and sys.stderr.isatty()
    total = 0
    for folder in args.folders:
        problems = check_site_folder(
            folder,
            affine_atol=guard.label_affine_tolerance,
            max_image_bytes=guard.max_image_bytes,
            allow_external_links=guard.allow_external_links,
            progress=progress,
            workers=args.workers,
        )
        for problem in problems:
            print(problem)
        try:
            site = load_site_dataset(
                folder, require_files=False, allow_external_links=guard.allow_external_links
            )
            cases = len(site.cases)
        except DataError:
            cases = 0
        name = printable(Path(folder).absolute().name)
        plural = "" if len(problems) == 1 else "s"
        print(f"{name}: {cases} cases, {len(problems)} problem{plural}")
        total += len(problems)
    return DataError.exit_code if total else 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
