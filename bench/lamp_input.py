"""LAMP's second claim: a larger training input raises Dice; run by hand, ends with one JSON line.

    python bench/lamp_input.py --seeds 3                  # demo 3D task, 16^3 / 32^3 / whole
    python bench/lamp_input.py --seeds 1 --steps 24       # a smoke run (minutes)
    python bench/lamp_input.py --data /data/Task06_Lung --holdout /data/lung-test \\
        --patches 64,64,64 96,96,96 whole --features 8,16,32,64

The LAMP paper (Zhu et al., MICCAI 2020, "LAMP: Large Deep Nets with Automated Model
Parallelism for Image Segmentation") trains the same U-Net on head-and-neck CT at growing
input sizes up to the whole volume and reports higher Dice with larger inputs; model
parallelism is what lets the large inputs fit. Here the same LAMP U-Net (``lamp_unet``, skips
carried) is trained with ``fedmed train`` at each ``--patches`` size, ``whole`` being the
largest training volume (rounded up to a multiple of 8 voxels; smaller volumes are padded), for
the same number of optimizer steps of one patch each (``--steps``): a larger input sees more
voxels and more context per step, which is the paper's point. Patches are drawn by label (half
centred on a lesion voxel) with fedmed's augmentation. The model after the last step is
evaluated on the held-out cases (sliding windows of the training input size, so the whole-volume
model predicts each volume in one window; no model selection on the held-out set).

Data: ``--data`` (MSD folders, pooled) and ``--holdout`` (an MSD folder), or by default a
generated demo 3D task: one site of ``--cases`` phantoms of ``--shape`` voxels (the demo's
site-A scanner, lesions of 1-4 cm in lungs) and ``--holdout-cases`` held-out phantoms from the
neutral scanner. Each volume is larger than every patch compared but the whole one.

Reports per size the held-out Dice (mean +- std over ``--seeds`` training seeds: initial
weights, patches, augmentation), HD95 and seconds per step (``fedmed train``'s epoch time over
its steps, so the validation after each epoch is included); the JSON line answers
"larger-input-raises-dice": whether the mean Dice rises with every larger input. A run's result
is ``OUT/<patch>-seed<N>/result.json``; an existing one with the same settings is read, not run
again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quality_table import seed_spread

from fedmed.cli.main import main as fedmed_main
from fedmed.data.demo import generate_demo_federation
from fedmed.io.header import parse_header
from fedmed.io.msd import load_site_dataset

__all__ = ["main", "whole_volume_patch"]

WHOLE = "whole"


def whole_volume_patch(folders: Sequence[Path], *, multiple: int = 8) -> tuple[int, int, int]:
    """The largest training volume's shape, each side rounded up to ``multiple`` voxels (the
    U-Net halves it at each level), read from the image headers."""
    largest = [0, 0, 0]
    for folder in folders:
        for case in load_site_dataset(folder).cases:
            shape = parse_header(case["image"]).shape[:3]
            largest = [max(a, int(b)) for a, b in zip(largest, shape, strict=True)]
    return tuple(math.ceil(n / multiple) * multiple for n in largest)  # type: ignore[return-value]


def _patch_label(patch: Sequence[int]) -> str:
    return "x".join(str(n) for n in patch)


def _run(args: argparse.Namespace, data: list[Path], holdout: Path, patch: Sequence[int],
         seed: int, out: Path) -> dict[str, Any]:  # fmt: skip
    run_dir = out / f"{_patch_label(patch)}-seed{seed}"
    settings = {
        "data": [str(d) for d in data], "holdout": str(holdout), "patch": list(patch),
        "seed": seed, "steps": args.steps, "features": args.features, "lr": args.lr,
    }  # fmt: skip
    saved = run_dir / "result.json"
    if saved.is_file():
        done = json.loads(saved.read_text(encoding="utf-8"))
        if done.get("settings") == settings:
            return done["result"]
    argv = [
        "train", "--data", *settings["data"], "--val-data", str(holdout),
        "--out", str(run_dir), "--model", "lamp_unet", "--features", args.features,
        "--patch-size", ",".join(str(n) for n in patch), "--batch-size", "1",
        "--steps", str(args.steps), "--lr", str(args.lr), "--seed", str(seed),
        "--loss", "dice-ce", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    if args.threads:
        argv += ["--threads", str(args.threads)]
    started = time.monotonic()
    code = fedmed_main(argv)
    if code != 0:
        raise SystemExit(f"fedmed train failed ({code}) for {run_dir}")
    epochs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    last = epochs[-1]
    train_s = sum(float(e["seconds"]) for e in epochs)
    result = {
        "dice": last["val_dice"],
        "hd95": last["val_hd95"],
        "steps": last["steps"],
        "s-per-step": round(train_s / max(1, last["steps"]), 3),
        "wall-s": round(time.monotonic() - started, 1),
    }
    saved.write_text(json.dumps({"settings": settings, "result": result}, indent=1) + "\n")
    return result


def _data(args: argparse.Namespace, out: Path) -> tuple[list[Path], Path]:
    if args.data:
        if not args.holdout:
            raise SystemExit("--data needs --holdout (an MSD folder with labelled test cases)")
        return [Path(d).absolute() for d in args.data], Path(args.holdout).absolute()
    root = out / "data"
    shape = tuple(int(n) for n in args.shape.split(","))
    if not (root / "site-A" / "dataset.json").is_file():
        generate_demo_federation(
            root, sites=1, cases=args.cases, seed=0, shape=shape, holdout=args.holdout_cases
        )
    return [root / "site-A"], root / "holdout"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train every size at every seed; print a table and the JSON summary line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench-lamp-input", help="output folder")
    p.add_argument("--data", nargs="+", metavar="DIR", help="MSD training folders (pooled)")
    p.add_argument("--holdout", metavar="DIR", help="MSD folder of held-out cases (with --data)")
    p.add_argument("--patches", nargs="+", default=["16,16,16", "32,32,32", WHOLE],
                   help=f"training input sizes, 'x,y,z' or '{WHOLE}'")  # fmt: skip
    p.add_argument("--seeds", type=int, default=3, help="training seeds (0 .. N-1)")
    p.add_argument("--steps", type=int, default=480, help="optimizer steps per run (1 patch)")
    p.add_argument("--features", default="8,16,32,64", help="LAMP U-Net features per level")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--cases", type=int, default=12, help="demo training cases")
    p.add_argument("--holdout-cases", type=int, default=8, help="demo held-out cases")
    p.add_argument("--shape", default="64,64,48", help="demo volume shape")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    data, holdout = _data(args, out)
    whole = whole_volume_patch(data)
    patches = [
        whole if text == WHOLE else tuple(int(n) for n in text.split(",")) for text in args.patches
    ]
    started = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {_patch_label(patch): [] for patch in patches}
    for seed in range(args.seeds):  # seed by seed: an interrupted study has every size
        for patch in patches:
            runs[_patch_label(patch)].append(_run(args, data, holdout, patch, seed, out))
    table = {
        size: {
            key: seed_spread([r[key] for r in results]) for key in ("dice", "hd95", "s-per-step")
        }
        for size, results in runs.items()
    }
    print(f"{'input':>12} {'held-out Dice':>18} {'HD95 mm':>16} {'s/step':>8}")
    for size, row in table.items():
        dice, hd = row["dice"], row["hd95"]
        print(
            f"{size:>12} {dice['mean']:>10.3f} +- {dice['std'] or 0:.3f} "
            f"{hd['mean'] if hd['mean'] is not None else float('nan'):>8.1f} +- "
            f"{hd['std'] or 0:.1f} {row['s-per-step']['mean']:>8.3f}"
        )
    means = [row["dice"]["mean"] for row in table.values()]
    result = {
        "bench": "lamp-input",
        "seeds": args.seeds,
        "steps": args.steps,
        "features": args.features,
        "whole-volume": list(whole),
        "data": [str(d) for d in data],
        "results": table,
        "larger-input-raises-dice": (
            all(b > a for a, b in itertools.pairwise(means)) if None not in means else None
        ),
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
