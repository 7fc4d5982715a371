"""``fedmed infer``: segment NIfTI images with a trained model, predictions in the input's grid.

``--model`` takes a ``fedmed train`` checkpoint (``best.safetensors``: the model, its options
and its preprocessing plan are in its metadata) or a federated run's round checkpoint
(``runs/.../checkpoints``, a ``round-NNNN`` folder or its ``weights.safetensors``; the
architecture is read off the weights' shapes, the preprocessing plan from the round's
``meta.json`` when it records one (else the default preprocessing), and ``--patch-size`` sets
the U-Nets' window). Each image goes through the training preprocessing (RAS orientation,
resampling to the training spacing, CT window: :mod:`fedmed.plan`), is predicted at that
spacing (2D slice by slice for COPLE-Net, 3D sliding windows with Gaussian blending for the
U-Nets), and the label map is mapped back through the recorded spatial steps (resampling
included) and written with the input's shape and affine. ``--device`` takes a device list
(``cuda:0,cuda:1``) to split a LAMP model.

Example::

    fedmed infer --model runs/central/best.safetensors --input scans/ --output preds/
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from fedmed.checkpoint import load_checkpoint
from fedmed.cli.train import set_threads
from fedmed.errors import ConfigError, DataError, ModelError
from fedmed.hardware import HardwareSettings
from fedmed.io.nifti import NIFTI_SUFFIXES, is_nifti
from fedmed.pipeline import PipelineSettings, preprocessing
from fedmed.plan import PreprocessingPlan
from fedmed.predict import predict_volume
from fedmed.security.at_rest import checkpoint_key, read_arrays
from fedmed.task import TrainConfig, build_network, load_arrays
from fedmed.transforms import save_prediction

__all__ = ["LoadedModel", "load_model", "predict_image", "register"]

logger = logging.getLogger(__name__)

_DEFAULT_3D_PATCH = (96, 96, 96)


class LoadedModel:
    """A network with its weights, the task config it was trained with and its preprocessing."""

    def __init__(
        self, model: torch.nn.Module, cfg: TrainConfig, settings: PipelineSettings
    ) -> None:
        self.model, self.cfg, self.settings = model, cfg, settings


def register(subparsers: Any) -> None:
    """Add the ``infer`` subcommand."""
    parser = subparsers.add_parser(
        "infer",
        help="segment NIfTI images with a trained model (predictions in the input geometry)",
        description="Predict label maps for a NIfTI file or every NIfTI image in a folder "
        "(its imagesTs/imagesTr too) and write OUTPUT/<image name> with the input's affine.",
    )
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        metavar="CKPT",
        help="fedmed train checkpoint or a federated run's checkpoint",
    )
    parser.add_argument("--input", type=Path, required=True, metavar="DIR|FILE")
    parser.add_argument("--output", type=Path, required=True, metavar="DIR")
    parser.add_argument(
        "--device", default="auto", help="auto, cpu, cuda, cuda:1, or cuda:0,cuda:1 for LAMP"
    )
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads (torch's default)")
    parser.add_argument(
        "--patch-size",
        metavar="N,N,N",
        help="3D window for round checkpoints without metadata (96,96,96)",
    )
    parser.set_defaults(func=_run)


def load_model(
    path: str | Path, *, device: str = "auto", patch_size: tuple[int, ...] | None = None
) -> LoadedModel:
    """Load a ``fedmed train`` checkpoint or a server round checkpoint (see the module doc)."""
    path = Path(path)
    weights_file = _server_weights(path)
    if weights_file is None:
        state, meta = load_checkpoint(path)
        if "task_config" not in meta:
            raise ModelError(
                f"checkpoint {path} has no task_config in its metadata: use a checkpoint "
                "written by fedmed train, or a federated run's round checkpoint"
            )
        cfg = TrainConfig.from_config(meta["task_config"])
        plan = PreprocessingPlan.from_metadata(meta, source=str(path))
        settings = plan.pipeline_settings() if plan else PipelineSettings()
    else:
        try:  # sealed when the server ran with FEDMED_CHECKPOINT_KEY: the same key opens it
            arrays = read_arrays(weights_file, key=checkpoint_key())
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelError(
                f"checkpoint {weights_file} is not readable safetensors ({err})"
            ) from err
        state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        meta_file = weights_file.parent / "meta.json"
        round_meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        plan = PreprocessingPlan.from_metadata(round_meta, source=str(meta_file))
        if plan is not None and patch_size is None:
            patch_size = plan.patch_size
        cfg = _config_from_weights(state, weights_file, patch_size)
        settings = plan.pipeline_settings() if plan else PipelineSettings()
    if patch_size is not None and len(patch_size) == cfg.spatial_dims:
        cfg = TrainConfig(**{**cfg.__dict__, "patch_size": tuple(patch_size)})
    model = build_network(cfg)
    arrays = {k: v.numpy() for k, v in state.items()}
    try:
        load_arrays(model, arrays)
    except ModelError as err:
        raise ModelError(f"checkpoint {path}: {err}") from err
    sample_shape = (1, cfg.in_channels, *cfg.patch_size)
    HardwareSettings(devices=device).prepare(model, sample_shape=sample_shape).eval()
    return LoadedModel(model, cfg, settings)


def _server_weights(path: Path) -> Path | None:
    """The weights file of a server round checkpoint at ``path``, else None (a train ckpt)."""
    if path.is_file():
        return path if path.name == "weights.safetensors" else None
    if not path.is_dir():
        raise ModelError(f"--model {path} does not exist: give a checkpoint file or folder")
    if (path / "weights.safetensors").is_file():
        return path / "weights.safetensors"
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    for pointer in ("best.json", "latest.json"):
        if (root / pointer).is_file():
            round_ = int(json.loads((root / pointer).read_text())["round"])
            return root / f"round-{round_:04d}" / "weights.safetensors"
    raise ModelError(
        f"--model {path}: no weights.safetensors, best.json or latest.json in it; give a "
        "fedmed train checkpoint (.safetensors) or a run's checkpoints folder"
    )


def _config_from_weights(
    state: dict[str, torch.Tensor], path: Path, patch_size: tuple[int, ...] | None
) -> TrainConfig:
    """Rebuild the architecture from the weights' names and shapes (no metadata there)."""
    if "in_conv.0.0.weight" in state and "out_conv.weight" in state:
        downs = sorted(
            int(m.group(1))
            for k in state
            if (m := re.fullmatch(r"downs\.(\d+)\.conv\.0\.0\.weight", k))
        )
        features = [state["in_conv.0.0.weight"].shape[0]]
        features += [state[f"downs.{i}.conv.0.0.weight"].shape[0] for i in downs]
        first, last = state["in_conv.0.0.weight"], state["out_conv.weight"]
        return TrainConfig(
            model="coplenet",
            model_features=tuple(int(f) for f in features),
            in_channels=int(first.shape[1]),
            out_channels=int(last.shape[0]),
            patch_size=(96, 96),
        )
    cells = sorted({int(k.split(".")[1]) for k in state if k.startswith("cells.")})
    if cells and "cells.0.block.0.weight" in state:
        encoder = [
            i
            for i in cells
            if f"cells.{i}.block.0.weight" in state and f"cells.{i}.up.weight" not in state
        ]
        encoder = [i for i in encoder if all(j in encoder for j in range(i))]
        features = [int(state[f"cells.{i}.block.0.weight"].shape[0]) for i in encoder]
        out = state[f"cells.{cells[-1]}.conv.weight"]
        return TrainConfig(
            model="unet3d",
            model_features=tuple(features),
            in_channels=int(state["cells.0.block.0.weight"].shape[1]),
            out_channels=int(out.shape[0]),
            patch_size=tuple(patch_size) if patch_size else _DEFAULT_3D_PATCH,
        )
    raise ModelError(f"checkpoint {path}: the weights are neither a COPLE-Net nor a fedmed U-Net")


def input_images(path: Path) -> list[Path]:
    """The NIfTI images at ``path``: the file, or the folder's (and its imagesTs/imagesTr)."""
    if path.is_file():
        if not is_nifti(path):
            raise DataError(f"--input {path} is not a NIfTI file (.nii or .nii.gz)")
        return [path]
    if not path.is_dir():
        raise DataError(f"--input {path} does not exist: give a NIfTI file or a folder")
    images: list[Path] = []
    for folder in (path, path / "imagesTs", path / "imagesTr"):
        if folder.is_dir():
            images += sorted(p for p in folder.iterdir() if is_nifti(p) and not _is_label(p))
    if not images:
        raise DataError(f"--input {path} holds no NIfTI image (searched it, imagesTs, imagesTr)")
    return images


def _is_label(path: Path) -> bool:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        name = name.removesuffix(suffix)
    return name.endswith("_seg")


def _parse_patch(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--patch-size {text!r} must be integers like 96,96,96") from None
    if not values or min(values) < 1:
        raise ConfigError(f"--patch-size {text!r} must be positive integers like 96,96,96")
    return values


def predict_image(loaded: LoadedModel, image: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """The label map of ``image`` on the model's grid (RAS, training spacing) and the image's
    meta, whose history maps it back to the file's geometry (``save_prediction``)."""
    item = preprocessing(loaded.settings, keys=("image",))({"image": str(image)})
    return predict_volume(loaded.model, item["image"], loaded.cfg).cpu(), item["image_meta"]


def _run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    loaded = load_model(args.model, device=args.device, patch_size=_parse_patch(args.patch_size))
    images = input_images(args.input)
    args.output.mkdir(parents=True, exist_ok=True)
    for image in images:
        label_map, meta = predict_image(loaded, image)
        out = save_prediction(
            args.output / image.name, label_map[None].to(torch.uint8), meta, dtype=np.uint8
        )
        logger.info("wrote %s", out)
    print(f"wrote {len(images)} prediction(s) to {args.output}")
    return 0
