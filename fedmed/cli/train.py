"""``fedmed train``: centralized training, the baseline every federated result compares with.

It runs the code a site runs (:mod:`fedmed.pipeline` for data, :class:`fedmed.train.LocalTrainer`
for the loop, :func:`fedmed.scoring.evaluate_model` for validation) on one or more data folders
pooled together, validates after each epoch and writes to ``--out``. The site's case guard runs
too (:mod:`fedmed.io.guard`): a case that fails the data check is skipped with a warning (or
stops the run with ``on-bad-case = "stop"`` in ``[train]``), and training is refused when fewer
than two usable cases remain.

- ``last.safetensors`` / ``best.safetensors`` (best validation Dice): weights plus JSON metadata
  naming the model, its options and its preprocessing plan (:mod:`fedmed.plan`: spacing,
  intensity window, patch size), so ``fedmed infer`` needs no other flag; ``last.json`` /
  ``best.json`` repeat that metadata for people.
- ``metrics.jsonl``: one line per epoch (loss, validation Dice and HD95, seconds).

Each epoch is one ``LocalTrainer.fit`` pass (a fresh Adam state per epoch, as in a site's round).
``--device`` takes a device list for LAMP (``cuda:0,cuda:1``); the hardware keys of
:mod:`fedmed.hardware` (``amp``, ``channels-last``, ``compile``, ``lamp-*``) may be set in the
``[train]`` table of ``--config``. ``--cache-dir`` caches the patients' images on disk: encrypted
with ``FEDMED_CACHE_KEY``, or in the clear only with ``--plaintext-cache`` (ConfigError
otherwise), as at a site.

Example::

    fedmed train --data demo/data/site-A demo/data/site-B --val-data demo/data/holdout \\
        --out runs/central --epochs 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fedmed.checkpoint import save_checkpoint
from fedmed.errors import ConfigError
from fedmed.globalmodel import build_network
from fedmed.hardware import AMP_MODES, HARDWARE_KEYS, HardwareSettings
from fedmed.io.guard import GuardSettings, require_cases
from fedmed.losses import LOSSES, NR_DENOMINATORS
from fedmed.nets import MODELS
from fedmed.patches import patch_loader
from fedmed.pipeline import (
    INTENSITIES,
    PipelineSettings,
    cached_volumes,
    load_cases,
    site_volumes,
)
from fedmed.plan import PreprocessingPlan
from fedmed.roundconfig import TrainConfig, trainer_config
from fedmed.scoring import evaluate_model
from fedmed.security.encryption import check_cache_at_rest
from fedmed.site_config import check_cache_mode
from fedmed.tomlfile import TomlTable, read_toml
from fedmed.train import LocalTrainer, TrainerConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "checkpoint_metadata",
    "preprocessing_plan",
    "register",
    "set_threads",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fedmed-model/1"
# [train] keys a --config file may set; flags given on the command line win.
_CONFIG_KEYS = {
    "model": str,
    "features": list,
    "epochs": int,
    "steps": int,
    "lr": float,
    "batch-size": int,
    "patch-size": list,
    "seed": int,
    "val-fraction": float,
    "pixdim": list,
    "hu-window": list,
    "intensity": str,
    "loss": str,
    "nr-gamma": float,
    "nr-denominator": str,
    "self-ensembling": bool,
    "cache-mode": str,
    "cache-dir": str,
    "plaintext-cache": bool,
    # the case guard, as in a site config
    "on-bad-case": str,
    "max-image-gib": float,
    "label-affine-tolerance": float,
    "allow-external-links": bool,
    # site hardware (fedmed.hardware); --device and --amp win
    "device": str,
    "amp": str,
    "channels-last": bool,
    "compile": bool,
    "lamp-micro-batches": int,
    "lamp-checkpointing": bool,
    "lamp-balance": str,
}
_DEFAULTS: dict[str, Any] = {
    "model": "coplenet",
    "epochs": 10,
    "lr": 1e-3,
    "batch-size": 8,
    "seed": 0,
    "val-fraction": 0.2,
}
_DEFAULT_PATCH = {2: [96, 96], 3: [64, 64, 64]}
_GUARD_KEYS = ("on-bad-case", "max-image-gib", "label-affine-tolerance", "allow-external-links")


def register(subparsers: Any) -> None:
    """Add the ``train`` subcommand."""
    parser = subparsers.add_parser(
        "train",
        help="centralized training on pooled data folders (the federated baseline)",
        description="Train a model on one or more data folders pooled together, validate "
        "each epoch, and write OUT/last.safetensors, OUT/best.safetensors and "
        "OUT/metrics.jsonl. Flags override the [train] table of --config.",
    )
    add = parser.add_argument
    add("--data", type=Path, nargs="+", required=True, metavar="DIR", help="training folders")
    add("--val-data", type=Path, nargs="+", metavar="DIR", help="validation folders "
        "(default: a by-patient split of --data, --val-fraction)")  # fmt: skip
    add("--out", type=Path, required=True, metavar="DIR", help="output folder")
    add("--model", choices=sorted(MODELS), help="network (coplenet)")
    add("--features", type=_int_list, metavar="N,N,...", help="features per level")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="passes over the training patches (10)")
    length.add_argument("--steps", type=int, help="optimizer steps in all (validated per pass)")
    add("--lr", type=float, help="learning rate (1e-3)")
    add("--batch-size", type=int, help="patches per batch (8)")
    add("--patch-size", type=_int_list, metavar="N,N[,N]", help="96,96 (2D) or 64,64,64 (3D)")
    add("--seed", type=int, help="seed of weights, split and patches (0)")
    add("--val-fraction", type=float, help="validation share without --val-data (0.2)")
    add("--pixdim", type=float, nargs=3, metavar=("X", "Y", "Z"), help="resample to mm")
    add("--intensity", choices=INTENSITIES, help="CT window or MR z-score (ct-window)")
    add("--loss", choices=LOSSES, help="nr-dice for coplenet, else dice-ce")
    add("--nr-gamma", type=float, help="noise-robust Dice exponent in [1, 2] (1.5)")
    add("--nr-denominator", choices=NR_DENOMINATORS, help="linear (reference code) or "
        "squared (the paper; Dice-like at gamma 2) (linear)")  # fmt: skip
    add("--self-ensembling", action=argparse.BooleanOptionalAction, default=None,
        help="COPLE-Net's adaptive EMA teacher (with --loss nr-dice)")  # fmt: skip
    add("--config", type=Path, metavar="FILE.toml", help="a TOML file with a [train] table")
    add("--device", help="auto, cpu, cuda, cuda:1, or a list for LAMP: cuda:0,cuda:1 (auto)")
    add("--amp", choices=AMP_MODES, help="mixed precision (auto: fp16 on CUDA, else off)")
    add("--cache-dir", type=Path, metavar="DIR", help="cache volumes on disk there (sealed "
        "with FEDMED_CACHE_KEY) instead of in memory")  # fmt: skip
    add("--plaintext-cache", action=argparse.BooleanOptionalAction, default=None,
        help="accept a disk cache of the images in the clear (no FEDMED_CACHE_KEY)")  # fmt: skip
    add("--threads", type=int, metavar="N", help="CPU threads for torch (torch's default)")
    add("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 96,96, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 96,96, got {text!r}")
    return values


def _read_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    table = TomlTable(path, "train", read_toml(path).get("train", {}))
    values = {key: table.get(key, kind, None) for key, kind in _CONFIG_KEYS.items()}
    table.finish()  # after a read of every key: its error lists them all as known
    return {key: value for key, value in values.items() if value is not None}


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """Config file values, then command-line flags, then defaults; validated."""
    options = {**_DEFAULTS, **_read_config(args.config)}
    for key in _CONFIG_KEYS:
        value = getattr(args, key.replace("-", "_"), None)
        if value is not None:
            options[key] = value
    if "steps" in options and args.epochs is not None:
        del options["steps"]  # --epochs on the command line beats steps in the file
    if options["model"] not in MODELS:
        raise ConfigError(f"model {options['model']!r} is unknown: use one of {sorted(MODELS)}")
    for key in ("epochs", "steps", "batch-size"):
        if key in options and options[key] < 1:
            raise ConfigError(f"--{key} {options[key]} must be >= 1")
    return options


def _build(options: dict[str, Any]) -> tuple[TrainConfig, PipelineSettings]:
    dims = 2 if options["model"] == "coplenet" else 3
    patch = tuple(options.get("patch-size") or _DEFAULT_PATCH[dims])
    if len(patch) != dims:
        raise ConfigError(
            f"--patch-size {','.join(map(str, patch))} has {len(patch)} sizes but "
            f"{options['model']} needs {dims}"
        )
    features = options.get("features")
    cfg = TrainConfig(
        model=options["model"],
        model_features=tuple(features) if features else None,
        patch_size=patch,
        lr=float(options["lr"]),
        batch_size=int(options["batch-size"]),
        val_fraction=float(options["val-fraction"]),
        seed=int(options["seed"]),
    )
    cache_dir = options.get("cache-dir")
    mode = options.get("cache-mode") or ("disk" if cache_dir else "memory")
    mode = check_cache_mode(mode, where="fedmed train [train] cache-mode")
    plaintext = bool(options.get("plaintext-cache", False))
    check_cache_at_rest(
        mode,
        plaintext_cache=plaintext,
        source=f"fedmed train --cache-dir {cache_dir}",
        opt_in="pass --plaintext-cache (or plaintext-cache = true in [train])",
    )
    if mode == "disk" and not plaintext:  # the pipeline refuses to write it in the clear
        mode = "disk-encrypted"
    pixdim = options.get("pixdim")
    guard = {k: v for k, v in options.items() if k in _GUARD_KEYS}
    settings = PipelineSettings(
        hu_window=tuple(options.get("hu-window", PipelineSettings.hu_window)),
        pixdim=tuple(float(p) for p in pixdim) if pixdim else None,
        intensity=str(options.get("intensity", "ct-window")),
        cache_mode=mode,
        cache_dir=Path(cache_dir) if cache_dir else None,
        guard=GuardSettings.from_node_config(guard, num_classes=cfg.out_channels),
    )
    return cfg, settings


def preprocessing_plan(cfg: TrainConfig, settings: PipelineSettings) -> PreprocessingPlan:
    """The plan of a run: the pipeline's spacing and intensity, the patch and the model."""
    options: dict[str, Any] = {"in_channels": cfg.in_channels, "out_channels": cfg.out_channels}
    if cfg.model_features:
        options["features"] = list(cfg.model_features)
    return PreprocessingPlan.from_settings(
        settings, patch_size=cfg.patch_size, model=cfg.model, model_options=options
    )


def checkpoint_metadata(
    cfg: TrainConfig, settings: PipelineSettings, **extra: Any
) -> dict[str, Any]:
    """What ``fedmed infer`` needs to rebuild the model and its preprocessing (``plan``:
    :meth:`fedmed.plan.PreprocessingPlan.to_metadata`)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": cfg.model,
        "task_config": cfg.to_config(),
        **preprocessing_plan(cfg, settings).to_metadata(),
        **extra,
    }


def _trainer_config(cfg: TrainConfig, options: dict[str, Any]) -> TrainerConfig:
    """The round's trainer settings (:func:`fedmed.roundconfig.trainer_config`) with the loss
    options."""
    local = trainer_config(cfg)
    changes = {
        field: options[key]
        for key, field in (
            ("loss", "loss"),
            ("nr-gamma", "gamma"),
            ("nr-denominator", "nr_denominator"),
            ("self-ensembling", "self_ensembling"),
        )
        if key in options
    }
    return dataclasses.replace(local, **changes)


def _loss_record(local: TrainerConfig) -> dict[str, Any]:
    """The loss settings a checkpoint was trained with, under their run-setting names."""
    return {
        "loss": local.loss.replace("_", "-"),
        "nr-gamma": local.gamma,
        "nr-denominator": local.nr_denominator,
        "self-ensembling": local.self_ensembling,
    }


def _hardware(options: dict[str, Any]) -> HardwareSettings:
    """The hardware keys of the options (``--device``/``--amp`` or the config's [train])."""
    values = {k: v for k, v in options.items() if k in HARDWARE_KEYS}
    return HardwareSettings.from_node_config(values, source="fedmed train")


def _run(args: argparse.Namespace) -> int:
    options = _options(args)
    cfg, settings = _build(options)
    set_threads(args.threads)
    hardware = _hardware(options)
    local = _trainer_config(cfg, options)
    device = ",".join(str(d) for d in hardware.devices)
    progress = not args.no_progress and sys.stderr.isatty()
    logger.info("caching the training and validation cases")
    if args.val_data:
        train_volumes = cached_volumes(load_cases(args.data, settings), settings, progress=progress)
        val_volumes = cached_volumes(
            load_cases(args.val_data, settings), settings, progress=progress
        )
        where = " ".join(str(d) for d in args.data)
        require_cases(len(train_volumes), len(val_volumes), where=where)
    else:
        train_volumes, val_volumes = site_volumes(
            args.data, settings, val_fraction=cfg.val_fraction, seed=cfg.seed, progress=progress
        )
    loader = patch_loader(
        train_volumes, patch_size=cfg.patch_size, batch_size=cfg.batch_size, seed=cfg.seed
    )
    per_epoch = len(loader)
    steps = options.get("steps")
    epochs = math.ceil(steps / per_epoch) if steps else int(options["epochs"])
    model = build_network(cfg, seed=cfg.seed)
    sample_shape = (1, cfg.in_channels, *cfg.patch_size)
    trainer = LocalTrainer(model, config=local, hardware=hardware, sample_shape=sample_shape)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "metrics.jsonl"
    log_path.write_text("")
    best = -math.inf
    done = 0
    logger.info("training %s: %d epochs of %d steps on %s", cfg.model, epochs, per_epoch, device)
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        epoch_steps = min(per_epoch, steps - done) if steps else per_epoch
        trainer.config = dataclasses.replace(trainer.config, epochs=1, steps=epoch_steps)
        loader.set_epoch(epoch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 1000 + epoch)
            result = trainer.fit(loader, progress=progress)
        done += result.steps
        val = evaluate_model(model, val_volumes, cfg) if len(val_volumes) else None
        record = {
            "epoch": epoch,
            "steps": done,
            "train_loss": result.loss,
            "val_dice": _finite(val["dice"]) if val else None,
            "val_hd95": _finite(val["hd95"]) if val else None,
            "seconds": round(time.perf_counter() - start, 3),
        }
        with log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        logger.info("epoch %d/%d: %s", epoch, epochs, record)
        meta = checkpoint_metadata(cfg, settings, training=_loss_record(trainer.config), **record)
        _save(args.out / "last", model, meta)
        score = -math.inf if record["val_dice"] is None else record["val_dice"]
        if score > best or epoch == 1:
            best = score
            _save(args.out / "best", model, meta)
    print(f"{args.out}: {epochs} epochs, {done} steps, best val Dice {best:.4f}")
    return 0


def set_threads(threads: int | None) -> None:
    """``--threads``: on a busy machine one thread per process beats contended ones."""
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"--threads {threads} must be >= 1")
    torch.set_num_threads(threads)


def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined metric (an empty mask) is null."""
    return None if math.isnan(value) else value


def _save(stem: Path, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    save_checkpoint(stem.with_suffix(".safetensors"), model, meta)
    stem.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
