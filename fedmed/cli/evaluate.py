"""``fedmed evaluate``: score a folder of predicted label maps against reference labels.

Pairing is by exact file name: ``--pred DIR/case1.nii.gz`` goes with ``--ref DIR/case1.nii.gz``
(``.nii`` and ``.nii.gz`` files are read; ``case1.nii`` does not pair with ``case1.nii.gz`` and
``case1_pred.nii.gz`` does not pair with ``case1.nii.gz``: nothing is guessed). Every file
must have its partner, and each pair must share the grid (shape, and affine within
``--affine-tol`` mm): otherwise a DataError names the files. Spacing comes from the
reference's header. Metrics and their edge cases are :mod:`fedmed.metrics`' (Dice, HD95 with
the image diagonal for a missed or spurious class, NSD at ``--nsd-tolerance`` mm, relative
volume error); the summaries are :mod:`fedmed.stats`' with the disclosure floor set by
``--disclosure-floor`` (1 by default: a site scores its own data).

Writes ``OUT/cases.csv`` (one row per case and class: ``case, class, dice, hd95, nsd, rve,
missed, spurious, both_empty``; undefined values are empty cells, flags 0/1) and
``OUT/summary.json`` (``n_cases``; ``n_missed``, ``n_spurious``, ``n_both_empty`` counting
(case, class) pairs; per-class means with counts and :func:`fedmed.stats.summarize_cases`
entries under ``classes``; the same for the per-case mean over classes under
``mean_over_classes``).

Example::

    fedmed evaluate --pred preds/ --ref labelsTs/ --out eval/ --nsd-tolerance 2
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fedmed.errors import ConfigError, DataError
from fedmed.io.check import DEFAULT_AFFINE_ATOL
from fedmed.io.nifti import NIFTI_SUFFIXES, is_nifti, read_nifti
from fedmed.metrics import DEFAULT_NSD_TOLERANCE_MM, METRICS, evaluate_case
from fedmed.stats import CASE_METRICS, summarize_cases
from fedmed.summary import combine_classes
from fedmed.summary import summarize as summarize_metrics

__all__ = ["evaluate_folders", "register", "summarize_folder"]

_CSV_COLUMNS = ("case", "class", *METRICS, "missed", "spurious", "both_empty")


def register(subparsers: Any) -> None:
    """Add the ``evaluate`` subcommand."""
    parser = subparsers.add_parser(
        "evaluate",
        help="score predicted label maps against references (Dice, HD95, NSD, volume error)",
        description="Pair --pred and --ref NIfTI files by exact file name, check each pair "
        "shares its grid, and write OUT/cases.csv (per case and class) and OUT/summary.json "
        "(counts, per-class means, bootstrap intervals, worst decile).",
    )
    parser.add_argument("--pred", type=Path, required=True, metavar="DIR", help="predictions")
    parser.add_argument("--ref", type=Path, required=True, metavar="DIR", help="references")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR")
    parser.add_argument(
        "--num-classes",
        type=int,
        metavar="N",
        help="label values are 0..N-1 (default 2, or the largest of --labels + 1)",
    )
    parser.add_argument(
        "--labels", metavar="1,2", help="classes to score (default every class but 0)"
    )
    parser.add_argument(
        "--nsd-tolerance",
        type=float,
        default=DEFAULT_NSD_TOLERANCE_MM,
        metavar="MM",
        help=f"NSD boundary tolerance in mm (default {DEFAULT_NSD_TOLERANCE_MM})",
    )
    parser.add_argument(
        "--disclosure-floor",
        type=int,
        default=1,
        metavar="N",
        help="fewest cases a summary entry is given for (default 1: your own data)",
    )
    parser.add_argument(
        "--affine-tol",
        type=float,
        default=DEFAULT_AFFINE_ATOL,
        metavar="MM",
        help=f"largest prediction/reference affine difference (default {DEFAULT_AFFINE_ATOL})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(func=_run)


def _nifti_files(folder: Path, flag: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{flag} {folder} is not a folder: give the folder of NIfTI files")
    files = {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_file() and is_nifti(p) and not p.name.startswith(".")
    }
    if not files:
        raise DataError(f"{flag} {folder} holds no NIfTI file (.nii or .nii.gz)")
    return files


def _case_id(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _unpaired_error(
    path: Path, kind: str, other_kind: str, folder: Path, others: Mapping[str, Path], count: int
) -> DataError:
    case = _case_id(path.name)
    near = [n for n in others if _case_id(n) == case]
    hint = f" ({near[0]} is there: names must match exactly)" if near else ""
    more = f"; {count - 1} more unpaired file(s)" if count > 1 else ""
    return DataError(
        f"{kind} {path} has no {other_kind} named {path.name} in {folder}{hint}{more}: "
        f"every file needs its partner under the same name"
    )


def _pairs(pred_dir: Path, ref_dir: Path) -> list[tuple[str, Path, Path]]:
    preds, refs = _nifti_files(pred_dir, "--pred"), _nifti_files(ref_dir, "--ref")
    no_pred = [refs[n] for n in refs if n not in preds]
    no_ref = [preds[n] for n in preds if n not in refs]
    count = len(no_pred) + len(no_ref)
    if no_pred:
        raise _unpaired_error(no_pred[0], "reference", "prediction", pred_dir, preds, count)
    if no_ref:
        raise _unpaired_error(no_ref[0], "prediction", "reference", ref_dir, refs, count)
    return [(_case_id(n), preds[n], refs[n]) for n in sorted(refs)]


def _label_map(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Integer label map, affine and spacing of ``path``; values checked against num_classes."""
    volume = read_nifti(path)
    array = volume.array
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(f"{path}: expected a 3D label map, got shape {volume.array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise DataError(f"{path}: label values must be integers, the file holds fractions")
        array = array.astype(np.int64)
    low, high = int(array.min()), int(array.max())
    if low < 0:
        raise DataError(f"{path}: label value {low} is negative: give label maps, not images")
    if high >= num_classes:
        raise DataError(
            f"{path}: label value {high} is outside 0..{num_classes - 1}: pass --num-classes "
            f"{high + 1} (or fix the file)"
        )
    return array, volume.affine, volume.spacing


def evaluate_folders(
    pred_dir: str | Path,
    ref_dir: str | Path,
    *,
    num_classes: int = 2,
    labels: Sequence[int] | None = None,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    affine_atol: float = DEFAULT_AFFINE_ATOL,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Per-case :func:`fedmed.metrics.evaluate_case` results (with ``case``) for the pairs of
    ``pred_dir`` and ``ref_dir``; DataError on an empty folder, an unpaired file, a grid
    mismatch or a label value outside ``0..num_classes-1``.

    Example:
        >>> cases = evaluate_folders("preds", "labelsTs", nsd_tolerance_mm=2.0)
        >>> cases[0]["hd95_1"], cases[0]["missed_1"]
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    pairs = _pairs(pred_dir, ref_dir)
    results = []
    for case, pred_path, ref_path in tqdm(
        pairs, desc="evaluate", unit="case", disable=not progress, leave=False
    ):
        pred, pred_affine, _ = _label_map(pred_path, num_classes)
        ref, ref_affine, spacing = _label_map(ref_path, num_classes)
        if pred.shape != ref.shape:
            raise DataError(
                f"prediction {pred_path} has shape {pred.shape} but its reference {ref_path} "
                f"has {ref.shape}: write the prediction on the reference grid (fedmed infer does)"
            )
        deviation = float(np.abs(pred_affine - ref_affine).max())
        if deviation > affine_atol:
            raise DataError(
                f"prediction {pred_path} and its reference {ref_path} have affines differing "
                f"by {deviation:.4g} mm (tolerance {affine_atol:g}): resample the prediction "
                "onto the reference grid, or raise --affine-tol if the difference is rounding"
            )
        metrics = evaluate_case(
            pred,
            ref,
            num_classes=num_classes,
            spacing=spacing,
            nsd_tolerance_mm=nsd_tolerance_mm,
            classes=labels,
        )
        results.append({"case": case, **metrics})
    return results


def summarize_folder(
    cases: Sequence[Mapping[str, Any]], labels: Sequence[int], *, floor: int = 1
) -> dict[str, Any]:
    """``summary.json``'s content for :func:`evaluate_folders`' ``cases`` (see the module doc).

    Example:
        >>> summarize_folder(evaluate_folders("preds", "labelsTs"), [1])["classes"]["1"]["dice"]
    """
    per_class = summarize_metrics(cases)
    classes: dict[str, Any] = {}
    for c in labels:
        block: dict[str, Any] = {}
        for name in METRICS:
            block[name], block[f"{name}_n"] = per_class[f"{name}_{c}"], per_class[f"{name}_{c}_n"]
        for flag in ("missed", "spurious", "both_empty"):
            block[f"n_{flag}"] = per_class[f"n_{flag}_{c}"]
        directions = {f"{n}_{c}": higher for n, higher in CASE_METRICS.items()}
        entries = summarize_cases(cases, metrics=directions, floor=floor)
        block["stats"] = {k.removesuffix(f"_{c}"): v for k, v in entries.items()}
        classes[str(c)] = block
    records = [combine_classes(case, labels) for case in cases]
    overall = summarize_metrics(records)
    mean_block: dict[str, Any] = {}
    for name in METRICS:
        mean_block[name], mean_block[f"{name}_n"] = overall[name], overall[f"{name}_n"]
    mean_block["stats"] = summarize_cases(records, metrics=CASE_METRICS, floor=floor)
    return {
        "n_cases": len(cases),
        "n_missed": per_class["n_missed"],
        "n_spurious": per_class["n_spurious"],
        "n_both_empty": per_class["n_both_empty"],
        "labels": list(labels),
        "disclosure_floor": floor,
        "classes": classes,
        "mean_over_classes": mean_block,
    }


def _json_safe(value: Any) -> Any:
    """NaN becomes null (JSON has no NaN); numpy scalars become Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _cell(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{path}: cannot write the file ({err})") from err


def _write_cases_csv(path: Path, cases: Sequence[Mapping[str, Any]], labels: Sequence[int]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_CSV_COLUMNS)
    for case in cases:
        for c in labels:
            values = [case[f"{name}_{c}"] for name in _CSV_COLUMNS[2:]]
            writer.writerow([case["case"], c, *(_cell(v) for v in values)])
    _write_atomic(path, buffer.getvalue())


def _parse_labels(text: str | None, num_classes: int | None) -> tuple[list[int], int]:
    """``(labels, num_classes)`` from ``--labels`` and ``--num-classes``."""
    labels: list[int] | None = None
    if text is not None:
        try:
            labels = [int(v) for v in text.split(",")]
        except ValueError:
            raise ConfigError(f"--labels {text!r} must be integers like 1,2") from None
        if len(set(labels)) != len(labels):
            raise ConfigError(f"--labels {text!r} repeats a class: list each once")
    if num_classes is None:
        num_classes = max(2, max(labels) + 1) if labels else 2
    if num_classes < 2:
        raise ConfigError(f"--num-classes must be >= 2 (background + classes), got {num_classes}")
    if labels is None:
        return list(range(1, num_classes)), num_classes
    if any(not 1 <= c < num_classes for c in labels):
        raise ConfigError(
            f"--labels {text!r} must lie in 1..{num_classes - 1} (--num-classes {num_classes})"
        )
    return labels, num_classes


def _run(args: argparse.Namespace) -> int:
    labels, num_classes = _parse_labels(args.labels, args.num_classes)
    if not args.nsd_tolerance >= 0:
        raise ConfigError(f"--nsd-tolerance must be >= 0 mm, got {args.nsd_tolerance}")
    if args.disclosure_floor < 1:
        raise ConfigError(f"--disclosure-floor must be >= 1, got {args.disclosure_floor}")
    cases = evaluate_folders(
        args.pred,
        args.ref,
        num_classes=num_classes,
        labels=labels,
        nsd_tolerance_mm=args.nsd_tolerance,
        affine_atol=args.affine_tol,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    summary = summarize_folder(cases, labels, floor=args.disclosure_floor)
    summary["nsd_tolerance_mm"] = args.nsd_tolerance
    args.out.mkdir(parents=True, exist_ok=True)
    _write_cases_csv(args.out / "cases.csv", cases, labels)
    text = json.dumps(_json_safe(summary), indent=2, sort_keys=True, allow_nan=False)
    _write_atomic(args.out / "summary.json", text + "\n")
    mean = summary["mean_over_classes"]
    print(
        f"{summary['n_cases']} cases ({summary['n_missed']} missed, {summary['n_spurious']} "
        f"spurious, {summary['n_both_empty']} both empty): Dice {mean['dice']:.3f}, "
        f"HD95 {mean['hd95']:.2f} mm, NSD@{args.nsd_tolerance:g}mm {mean['nsd']:.3f}; "
        f"wrote {args.out / 'cases.csv'} and {args.out / 'summary.json'}"
    )
    return 0
