"""``fedmed-sim``: a whole federation simulated on this machine, compared with centralized training.

With no arguments it writes the demo federation (3 sites with different scanners, site-C with
noisy labels, and a held-out set) into ``fedmed-sim-run/data``, trains COPLE-Net on Flower's
simulation engine for a few rounds on CPU and prints the held-out Dice after every round.

Output folder layout::

    OUT/data/            site folders (demo, pooled split or shifted copies) and holdout/
    OUT/runs/<run>/      metrics.jsonl, checkpoints/, report.md + plots of each strategy run
    OUT/centralized/     the centralized baseline (--centralized), same record format
    OUT/report.md        the comparison: compare_holdout.png, compare_sites.png, table
    OUT/summary.json     the table's figures

Example::

    fedmed-sim
    fedmed-sim --compare fedavg,fedprox,fedbn --centralized --rounds 5
    fedmed-sim --pooled /data/Task09 --split size-skew --alpha 0.3 --sites 8 --out runs/skew
    fedmed-sim --sites 64 --sites-per-round 8 --out runs/many
    fedmed-sim --sites 2 --model lamp_unet --features 4,8,16 --patch-size 16,16,16 \
        --site-devices cpu,cpu cpu       # site-A trains LAMP split over two CPU stages
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from fedmed.cli.runner import add_version, run_command
from fedmed.errors import ConfigError
from fedmed.flower.version import check_flower_version

from .config import SimConfig, load_sim_config, run_settings
from .console import RoundPrinter, configure_sim_logging, format_record
from .sites import SimData, pooled_federation, shifted_federation

__all__ = [
    "build_parser",
    "console_main",
    "main",
    "parse_config",
    "prepare_data",
    "run_sim",
]

logger = logging.getLogger("fedmed.simulation")


def build_parser() -> argparse.ArgumentParser:
    """The ``fedmed-sim`` argument parser."""
    p = argparse.ArgumentParser(
        prog="fedmed-sim",
        description="Simulate a federation on this machine (Flower's simulation engine). "
        "With no arguments: the demo federation, COPLE-Net, a few rounds on CPU.",
    )
    add_version(p)
    p.add_argument("--config", metavar="TOML", help="settings file (e.g. configs/sim.toml)")
    p.add_argument("--out", metavar="DIR", help="output folder (default fedmed-sim-run)")
    p.add_argument("--sites", type=int, help="number of simulated sites")
    p.add_argument(
        "--sites-per-round",
        type=int,
        metavar="N",
        help="sites sampled to train each round (0 = all; memory and time follow N)",
    )
    p.add_argument("--rounds", type=int, help="federated rounds")
    p.add_argument("--model", help="coplenet, unet3d or lamp_unet")
    p.add_argument("--features", metavar="C1,C2,..", help="model channels per level")
    p.add_argument("--patch-size", metavar="N,N[,N]", help="training patch")
    p.add_argument("--strategy", help="fedavg, fedprox, fedbn, fedadam, fedyogi, ...")
    p.add_argument("--compare", metavar="S1,S2,..", help="run several strategies, one report")
    p.add_argument("--local-epochs", type=int, help="local epochs per round")
    p.add_argument("--local-steps", type=int, help="cap on local steps per round (0 = none)")
    p.add_argument("--lr", type=float, help="site learning rate")
    p.add_argument("--seed", type=int, help="seeds data splits, model and sampling")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", nargs="+", metavar="DIR", help="one data folder per site")
    src.add_argument("--pooled", metavar="DIR", help="one folder split into --sites by patient")
    p.add_argument("--holdout", metavar="DIR", help="the server's held-out folder")
    p.add_argument("--split", help="pooled split: iid, label-skew or size-skew")
    p.add_argument("--alpha", type=float, help="Dirichlet alpha of the skewed splits")
    p.add_argument("--centralized", action="store_true", help="also train on the pooled data")
    p.add_argument(
        "--local-baselines",
        action="store_true",
        help="each site also trains a local-only model (as many samples as in the run)",
    )
    p.add_argument(
        "--disclosure-floor",
        type=int,
        metavar="N",
        help="fewest cases a site's evaluation summary may describe (default 5)",
    )
    p.add_argument(
        "--share-models",
        action="store_true",
        help="the sites let their own models travel for cross-site evaluation",
    )
    p.add_argument(
        "--max-epsilon",
        type=float,
        metavar="EPS",
        help="each site's own privacy budget (epsilon per patient, over all runs; default none)",
    )
    p.add_argument(
        "--site-devices",
        nargs="+",
        metavar="DEVICES",
        help="one device list per site, e.g. --site-devices cpu,cpu cpu (site-A splits a "
        "LAMP model over two CPU stages); cuda needs --num-gpus > 0",
    )
    p.add_argument("--num-cpus", type=int, help="CPU cores per site")
    p.add_argument("--num-gpus", type=float, help="GPU fraction per site (0 = CPU)")
    p.add_argument("--max-parallel", type=int, help="sites training at once")
    p.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="run the sites on an existing Ray cluster (ray start --head); default: $RAY_ADDRESS, "
        "else a private local Ray",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="Flower's and the sites' logs")
    return p


def _app_overrides(args: argparse.Namespace) -> dict[str, Any]:
    pairs = {
        "num-rounds": args.rounds,
        "model": args.model,
        "model-features": args.features,
        "patch-size": args.patch_size,
        "local-epochs": args.local_epochs,
        "local-steps": args.local_steps,
        "lr": args.lr,
        "sites-per-round": args.sites_per_round,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def parse_config(argv: Sequence[str]) -> tuple[SimConfig, bool]:
    """Settings from ``--config`` plus flags, validated; returns ``(config, verbose)``.

    Raises ConfigError for contradictory or invalid values (argparse exits 2 on syntax).
    """
    args = build_parser().parse_args(list(argv))
    cfg = load_sim_config(args.config)
    if args.strategy and args.compare:
        raise ConfigError("give --strategy or --compare, not both")
    if args.split is not None and not args.pooled and cfg.data.source != "pooled":
        raise ConfigError("--split applies to --pooled data: add --pooled DIR")
    data = cfg.data
    if args.data:
        data = dataclasses.replace(data, source="folders", folders=tuple(args.data))
    if args.pooled:
        data = dataclasses.replace(data, source="pooled", pooled=args.pooled)
    for name, value in (("holdout", args.holdout), ("split", args.split), ("alpha", args.alpha)):
        if value is not None:
            data = dataclasses.replace(data, **{name: value})
    sites = args.sites if args.sites is not None else cfg.sites
    if args.data and args.sites is None:
        sites = len(args.data)
    strategies = cfg.strategies
    if args.strategy:
        strategies = (args.strategy,)
    if args.compare:
        strategies = tuple(s.strip() for s in args.compare.split(",") if s.strip())
    res = cfg.resources
    for name, value in (
        ("num_cpus", args.num_cpus),
        ("num_gpus", args.num_gpus),
        ("max_parallel", args.max_parallel),
        ("ray_address", args.ray_address),
    ):
        if value is not None:
            res = dataclasses.replace(res, **{name: value})
    if not res.ray_address and os.environ.get("RAY_ADDRESS"):
        res = dataclasses.replace(res, ray_address=os.environ["RAY_ADDRESS"])
    policy = cfg.policy
    if args.disclosure_floor is not None:
        policy = dataclasses.replace(policy, disclosure_floor=args.disclosure_floor)
    if args.share_models:
        policy = dataclasses.replace(policy, share_models=True)
    if args.max_epsilon is not None:
        policy = dataclasses.replace(policy, max_epsilon=args.max_epsilon)
    if args.site_devices:
        policy = dataclasses.replace(policy, devices=tuple(args.site_devices))
    cfg = SimConfig(
        out=args.out or cfg.out,
        sites=sites,
        seed=args.seed if args.seed is not None else cfg.seed,
        strategies=strategies,
        centralized=args.centralized or cfg.centralized,
        local_baselines=args.local_baselines or cfg.local_baselines,
        data=data,
        resources=res,
        policy=policy,
        app={**cfg.app, **_app_overrides(args)},
    )
    return cfg, args.verbose


def prepare_data(cfg: SimConfig, out: Path) -> SimData:
    """Write or link the site folders under ``out/data``; the held-out folder too."""
    spec, root = cfg.data, out / "data"
    shifts = spec.shift_by_index(cfg.sites)
    if spec.source == "demo":
        from fedmed.data.demo import HOLDOUT_DIRNAME, generate_demo_federation

        demo = root / "demo"
        print(f"fedmed-sim: writing the demo federation ({cfg.sites} sites) to {demo}")
        folders = generate_demo_federation(
            demo,
            sites=cfg.sites,
            cases=spec.demo_cases,
            seed=cfg.seed,
            shape=spec.demo_shape,
            holdout=spec.demo_holdout,
        )
        holdout = spec.holdout or (str(demo / HOLDOUT_DIRNAME) if spec.demo_holdout else "")
        return shifted_federation(
            folders, root / "shifted", shifts=shifts, holdout=holdout, seed=cfg.seed
        )
    if spec.source == "folders":
        return shifted_federation(
            spec.folders, root / "shifted", shifts=shifts, holdout=spec.holdout, seed=cfg.seed
        )
    data = pooled_federation(
        spec.pooled,
        root / "pooled-split",
        sites=cfg.sites,
        method=spec.split,
        alpha=spec.alpha,
        seed=cfg.seed,
        holdout_fraction=0.0 if spec.holdout else spec.holdout_fraction,
        shifts=shifts,
    )
    return dataclasses.replace(data, holdout=Path(spec.holdout)) if spec.holdout else data


def _fresh(folder: Path) -> None:
    """Remove an earlier fedmed run in ``folder`` (a simulation starts from round 0)."""
    if (folder / "metrics.jsonl").exists() or (folder / "checkpoints").exists():
        shutil.rmtree(folder)


def run_sim(cfg: SimConfig, *, verbose: bool = False) -> Path:
    """Run every configured strategy (and the baseline); return the comparison report's path."""
    from .centralized import CENTRALIZED_MODEL, train_centralized
    from .engine import run_federation, torch_threads
    from .report import write_comparison

    out = Path(cfg.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, out)
    holdout = str(data.holdout) if data.holdout else ""
    if not holdout:
        logger.warning("no held-out folder: the report has no held-out Dice (give --holdout)")
    runs: dict[str, list[dict[str, Any]]] = {}
    links: dict[str, str] = {}
    central = None
    references = ""
    if cfg.centralized:  # first: its model joins each run's cross-site evaluation
        central_dir = out / "centralized"
        _fresh(central_dir)
        settings = run_settings(cfg, "fedavg", out_dir=str(central_dir), holdout=holdout)
        print("fedmed-sim: centralized baseline on the pooled training data")
        with torch_threads(cfg.resources.num_cpus):
            central = train_centralized(
                settings,
                data.sites,
                out_dir=central_dir,
                on_record=lambda r: print(format_record("centralized", r), flush=True),
            )
        links["centralized"] = "centralized/report.md"
        references = json.dumps({"centralized": str(central_dir / CENTRALIZED_MODEL)})
    for label in cfg.strategies:
        run_dir = out / "runs" / label
        _fresh(run_dir)
        settings = run_settings(
            cfg, label, out_dir=str(run_dir), holdout=holdout, references=references
        )
        print(f"fedmed-sim: {label}: {cfg.sites} sites x {settings.num_rounds} rounds -> {run_dir}")
        started = time.monotonic()
        with RoundPrinter(label, run_dir) as printer:
            run_federation(
                settings,
                data.sites,
                cfg.resources,
                workdir=out,
                verbose=verbose,
                policy=cfg.policy,
            )
        runs[label] = printer.log.read()
        links[label] = f"runs/{label}/report.md"
        print(f"fedmed-sim: {label} finished in {time.monotonic() - started:.0f} s")
    report = write_comparison(
        out,
        runs,
        centralized=central,
        settings=dict(cfg.app),
        links=links,
    )
    print(f"fedmed-sim: report in {report}")
    return report


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedmed-sim``; SIGTERM stops like Ctrl-C (Ray is shut down)."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def command() -> int:
        cfg, verbose = parse_config(argv)
        check_flower_version()
        configure_sim_logging(verbose)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupt)
        run_sim(cfg, verbose=verbose)
        return 0

    return run_command(command, prog="fedmed-sim")


def console_main(argv: Sequence[str] | None = None) -> int:
    """The ``fedmed-sim`` console script (the SuperLink and Ray run in child processes that
    :func:`main` stops, so nothing is left to wait for when it returns)."""
    return main(argv)
