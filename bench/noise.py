"""COPLE-Net's claim on the demo federation: noise-robust training vs plain Dice when one site's
labels are noisy; run by hand, ends with one JSON line.

    python bench/noise.py --seeds 3              # the demo settings (configs/sim.toml)
    python bench/noise.py --seeds 1 --rounds 1 --quick   # a smoke run (minutes)
    python bench/noise.py --protocol quality --seeds 3   # the stable protocol (README Quality)

The demo federation (``fedmed-sim``'s: site-A clean, site-B a shifted scanner, site-C a shifted
scanner whose annotators dilated, eroded or missed 60 % of the lesions; held-out cases from a
neutral scanner with clean labels) is trained with each recipe:

- ``dice``: the soft Dice loss;
- ``nr-dice``: COPLE-Net's noise-robust Dice (gamma 1.5, the reference code's linear
  denominator);
- ``nr-dice+se``: the noise-robust Dice with adaptive self-ensembling (an EMA teacher at each
  site, decay 0.99).

Each recipe runs FedAvg and the centralized baseline (pooled training data, same epochs/steps)
for ``--seeds`` training seeds (the data stay those of ``--data-seed``: only the initial model,
the patches and the splits' shuffles change). Reported per recipe: the held-out Dice after the
last round (the held-out labels are clean) as mean +- std over the seeds, federated and
centralized, and site-C's validation Dice against its noisy labels and against the clean ones
the demo generator keeps (``val-dice-clean``). The question the JSON line answers:
``nr-dice+se`` beats ``dice`` on held-out Dice (federated, mean over seeds)?

``--protocol quality`` runs the recipes on the quality benchmark's stable protocol instead
(``configs/quality.toml``: 3 sites x 16 patients, site-C's labels noisy, 16 held-out patients,
20 rounds; each run through ``bench/quality.py --methods centralized,fedavg --app ...``, whose
results it reads and keeps, resumable, in ``bench/results/quality/quality-<setting>/``). Its
``nr-dice`` recipe is the protocol itself (COPLE-Net's default loss is the noise-robust Dice),
so those results are the quality table's FedAvg and centralized rows. Site-C's figure there is
its validation Dice against its noisy labels, from the run's cross-site evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedmed.simulation.cli import run_sim
from fedmed.simulation.config import load_sim_config
from fedmed.simulation.console import configure_sim_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # bench/quality.py: the stable protocol's runs
from quality_table import result_path, seed_spread

__all__ = ["RECIPES", "main"]

RECIPES: Mapping[str, Mapping[str, Any]] = {
    "dice": {"loss": "dice"},
    "nr-dice": {"loss": "nr-dice"},
    "nr-dice+se": {"loss": "nr-dice", "self-ensembling": True},
}
NOISY_SITE = "site-C"
# the recipes as changes to the quality protocol (whose own loss, auto, is nr-dice for COPLE-Net)
QUALITY_OVERRIDES: Mapping[str, tuple[str, ...]] = {
    "dice": ("loss=dice",),
    "nr-dice": (),
    "nr-dice+se": ("loss=nr-dice", "self-ensembling=true"),
}


def _records(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [r for r in (json.loads(x) for x in lines if x.strip()) if r.get("status") == "ok"]


def _final(records: Sequence[Mapping[str, Any]], *keys: str) -> float | None:
    """The last round's value at ``keys`` (e.g. ``"holdout", "dice"``), or None."""
    if not records:
        return None
    value: Any = records[-1]
    for key in keys:
        value = (value or {}).get(key)
    return None if value is None else float(value)


def _run(cfg: Any, out: Path, recipe: str, seed: int, app: Mapping[str, Any]) -> dict[str, Any]:
    """One recipe at one training seed: FedAvg and the centralized baseline. Resumable: a run
    whose ``result.json`` exists (with the same settings) is read, not run again."""
    saved = out / f"{recipe}-seed{seed}" / "result.json"
    settings = {**app, **RECIPES[recipe], "seed": seed}
    if saved.is_file():
        done = json.loads(saved.read_text(encoding="utf-8"))
        if done.get("settings") == json.loads(json.dumps(settings)):
            return done["result"]
    result = _train(cfg, out, recipe, seed, app)
    saved.write_text(json.dumps({"settings": settings, "result": result}, indent=1) + "\n")
    return result


def _train(cfg: Any, out: Path, recipe: str, seed: int, app: Mapping[str, Any]) -> dict[str, Any]:
    run_cfg = dataclasses.replace(
        cfg,
        out=str(out / f"{recipe}-seed{seed}"),
        strategies=("fedavg",),
        centralized=True,
        app={**app, **RECIPES[recipe], "seed": seed},
    )
    report = run_sim(run_cfg)
    folder = Path(report).parent
    federated = _records(folder / "runs" / "fedavg" / "metrics.jsonl")
    central = _records(folder / "centralized" / "metrics.jsonl")
    return {
        "federated": _final(federated, "holdout", "dice"),
        "centralized": _final(central, "holdout", "dice"),
        "noisy-val-dice": _final(federated, "sites", NOISY_SITE, "val-dice"),
        "noisy-val-dice-clean": _final(federated, "sites", NOISY_SITE, "val-dice-clean"),
    }


def _on_quality_protocol(recipe: str, seeds: int, *, quick: bool) -> list[dict[str, Any]]:
    """One recipe at each seed on the quality protocol (runs what is missing)."""
    cfg, _, _ = quality.protocol(quality.CONFIG, quick=quick, data=None)
    if recipe == "nr-dice" and (cfg.app.get("model"), cfg.app.get("loss", "auto")) not in (
        ("coplenet", "auto"),
        ("coplenet", "nr-dice"),
    ):
        raise SystemExit(f"{quality.CONFIG}: the nr-dice recipe needs COPLE-Net's own loss")
    argv = ["--methods", "centralized,fedavg", "--seeds", str(seeds)] + (["--quick"] * quick)
    for override in QUALITY_OVERRIDES[recipe]:
        argv += ["--app", override]
    results = Path(quality.main(argv)["results"])

    def read(method: str, seed: int) -> dict[str, Any]:
        return json.loads(result_path(results, method, seed).read_text(encoding="utf-8"))

    out = []
    for seed in range(seeds):
        fed, central = read("fedavg", seed), read("centralized", seed)
        out.append({
            "federated": fed["holdout"]["dice"]["mean"],
            "centralized": central["holdout"]["dice"]["mean"],
            "noisy-val-dice": fed["sites"][NOISY_SITE]["dice"]["mean"],
            "noisy-val-dice-clean": None,
        })  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every recipe at every seed; print a table and the JSON summary line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench-noise", help="output folder")
    p.add_argument("--seeds", type=int, default=3, help="training seeds (0 .. N-1)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the demo data")
    p.add_argument("--rounds", type=int, help="federated rounds (default: sim.toml's)")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset")
    p.add_argument("--quick", action="store_true", help="8..128 channels, 32x32 patches")
    p.add_argument(
        "--protocol",
        choices=("demo", "quality"),
        default="demo",
        help="the demo's settings, or the quality benchmark's stable protocol",
    )
    args = p.parse_args(argv)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown or args.seeds < 1:
        p.error(f"--recipes takes {', '.join(RECIPES)}; --seeds >= 1 (got {unknown or args.seeds})")
    configure_sim_logging(False)
    cfg = dataclasses.replace(load_sim_config(None), seed=args.data_seed)
    app = dict(cfg.app)
    if args.rounds:
        app["num-rounds"] = args.rounds
    if args.quick:
        app.update({"model-features": "8,16,32,64,128", "patch-size": "32,32"})
    out = Path(args.out).absolute()
    started = time.monotonic()
    if args.protocol == "quality":
        runs = {r: _on_quality_protocol(r, args.seeds, quick=args.quick) for r in recipes}
        app = dict(quality.protocol(quality.CONFIG, quick=args.quick, data=None)[0].app)
    else:
        runs = {
            recipe: [_run(cfg, out, recipe, seed, app) for seed in range(args.seeds)]
            for recipe in recipes
        }
    table = {
        recipe: {key: seed_spread([r[key] for r in results]) for key in results[0]}
        for recipe, results in runs.items()
    }
    print(f"{'recipe':12} {'federated':>16} {'centralized':>16} {NOISY_SITE + ' noisy/clean':>22}")
    for recipe, row in table.items():

        def cell(key: str, row: Mapping[str, Any] = row) -> str:
            mean, std = row[key]["mean"], row[key]["std"]
            return "-" if mean is None else f"{mean:.3f}" + (f" +- {std:.3f}" if std else "")

        site = f"{cell('noisy-val-dice')} / {cell('noisy-val-dice-clean')}"
        print(f"{recipe:12} {cell('federated'):>16} {cell('centralized'):>16} {site:>22}")
    fed = {recipe: row["federated"]["mean"] for recipe, row in table.items()}
    result = {
        "bench": "noise",
        "protocol": args.protocol,
        "seeds": args.seeds,
        "data-seed": args.data_seed,
        "rounds": app["num-rounds"],
        "model-features": app["model-features"],
        "patch-size": app["patch-size"],
        "results": table,
        "nr-dice+se-beats-dice": (
            fed["nr-dice+se"] > fed["dice"]
            if fed.get("nr-dice+se") is not None and fed.get("dice") is not None
            else None
        ),
        "seconds": round(time.monotonic() - started, 1),
        "out": str(out),
    }
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
