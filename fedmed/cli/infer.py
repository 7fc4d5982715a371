"""``fedmed infer``: segment NIfTI images with a trained model, predictions in the input's grid.

``--model`` takes a ``fedmed train`` checkpoint (``best.safetensors``: the model, its options
and its preprocessing plan are in its metadata) or a federated run's round checkpoint
(``runs/.../checkpoints``, a ``round-NNNN`` folder or its ``weights.safetensors``; the
preprocessing plan comes from the round's ``meta.json``, which every round of a federated run
records, with the network's name and options; a round without one falls back to the default
preprocessing and the architecture the weights' shapes imply, and ``--patch-size`` sets the
U-Nets' window). Each image goes through the training preprocessing (RAS orientation,
resampling to the training spacing, CT window: :mod:`fedmed.plan`), is predicted at that
spacing (2D slice by slice for COPLE-Net, 3D sliding windows with Gaussian blending for the
U-Nets), and the label map is mapped back through the recorded spatial steps (resampling
included) and written with the input's shape and affine. ``--device`` takes a device list
(``cuda:0,cuda:1``) to split a LAMP model.

With ``--ca ca.pem`` a round checkpoint is verified before it is loaded: the signed chain from
round 0 to that round, its files, and that ``best.json``/``latest.json`` name exactly that
round (:func:`fedmed.security.chain.check_loadable`). Whatever the checkpoint's metadata or
weights ask for (features, window, pixdim, memory) is bounded before anything is built
(:mod:`fedmed.cli.model_limits`, ``--max-memory``).

Example::

    fedmed infer --model runs/central/best.safetensors --input scans/ --output preds/
    fedmed infer --model runs/server --ca certs/ca.pem --input scans/ --output preds/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from fedmed.checkpoint import load_checkpoint
from fedmed.cli.model_limits import DEFAULT_MAX_BYTES, check_image_request, check_model_request
from fedmed.cli.train import set_threads
from fedmed.errors import ConfigError, DataError, ModelError, SecurityError
from fedmed.globalmodel import build_network, load_arrays
from fedmed.hardware import HardwareSettings
from fedmed.io.nifti import NIFTI_SUFFIXES, is_nifti, read_nifti_header
from fedmed.pipeline import PipelineSettings, preprocessing
from fedmed.plan import PreprocessingPlan
from fedmed.predict import predict_volume
from fedmed.roundconfig import TrainConfig
from fedmed.security.at_rest import checkpoint_key, read_arrays
from fedmed.security.chain import round_folder_name
from fedmed.security.pointers import check_loadable, read_pointer
from fedmed.security.signing import Verifier
from fedmed.transforms import save_prediction

__all__ = ["LoadedModel", "load_model", "predict_image", "register"]

logger = logging.getLogger(__name__)

_DEFAULT_3D_PATCH = (96, 96, 96)


class LoadedModel:
    """A network with its weights, the task config it was trained with and its preprocessing."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: TrainConfig,
        settings: PipelineSettings,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.model, self.cfg, self.settings = model, cfg, settings
        self.max_bytes = max_bytes

    def check_input(self, image: Path) -> None:
        """ModelError when ``image``, resampled to this model's pixdim, would need more memory
        than the cap (read from its header; nothing is allocated)."""
        shape, affine = read_nifti_header(image)
        check_image_request(
            shape,
            np.linalg.norm(affine[:3, :3], axis=0),
            self.cfg,
            pixdim=self.settings.pixdim,
            image=str(image),
            max_bytes=self.max_bytes,
        )


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
    parser.add_argument(
        "--ca",
        type=Path,
        metavar="CA.PEM",
        help="federation CA: verify a run's round checkpoint (signature chain, files, pointer) "
        "before loading it",
    )
    parser.add_argument(
        "--max-memory",
        type=float,
        default=DEFAULT_MAX_BYTES / (1 << 30),
        metavar="GIB",
        help="refuse a model or image needing more memory than this (default %(default)g GiB)",
    )
    parser.set_defaults(func=_run)


def load_model(
    path: str | Path,
    *,
    device: str = "auto",
    patch_size: tuple[int, ...] | None = None,
    ca: str | Path | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> LoadedModel:
    """Load a ``fedmed train`` checkpoint or a server round checkpoint (see the module doc).

    ``ca``: verify a round checkpoint against the federation CA first (SecurityError when it
    fails; a ``fedmed train`` checkpoint is not signed and is refused). What the checkpoint asks
    for is bounded by :func:`~fedmed.cli.model_limits.check_model_request` (ModelError).
    """
    path = Path(path)
    verifier = Verifier.from_ca_file(ca) if ca is not None else None
    weights_file = _server_weights(path, verifier=verifier)
    if weights_file is None:
        if verifier is not None:
            raise SecurityError(
                f"--model {path} is a fedmed train checkpoint, which carries no signature: --ca "
                "verifies a federated run's round checkpoints; drop --ca to load it unverified"
            )
        _check_size(path, max_bytes)
        state, meta = load_checkpoint(path)
        if "task_config" not in meta:
            raise ModelError(
                f"checkpoint {path} has no task_config in its metadata: use a checkpoint "
                "written by fedmed train, or a federated run's round checkpoint"
            )
        try:
            cfg = TrainConfig.from_config(meta["task_config"])
            plan = PreprocessingPlan.from_metadata(meta, source=str(path))
            settings = plan.pipeline_settings() if plan else PipelineSettings()
        except (ConfigError, TypeError, ValueError, AttributeError) as err:
            raise ModelError(f"checkpoint {path} has invalid metadata ({err})") from err
    else:
        _check_size(weights_file, max_bytes)
        try:  # sealed when the server ran with FEDMED_CHECKPOINT_KEY: the same key opens it
            arrays = read_arrays(weights_file, key=checkpoint_key())
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelError(
                f"checkpoint {weights_file} is not readable safetensors ({err})"
            ) from err
        state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        meta_file = weights_file.parent / "meta.json"
        try:
            round_meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        except (OSError, ValueError) as err:
            raise ModelError(f"{meta_file} is not readable JSON ({err})") from err
        if not isinstance(round_meta, dict):
            raise ModelError(f"{meta_file} is not a JSON object: the round checkpoint is damaged")
        plan = PreprocessingPlan.from_metadata(round_meta, source=str(meta_file))
        if plan is not None and patch_size is None:
            patch_size = plan.patch_size
        cfg = _config_from_weights(state, weights_file, patch_size)
        if plan is not None and plan.model_options:
            cfg = _config_from_plan(plan, cfg, source=str(meta_file))
        settings = plan.pipeline_settings() if plan else PipelineSettings()
    if patch_size is not None and len(patch_size) == cfg.spatial_dims:
        cfg = TrainConfig(**{**cfg.__dict__, "patch_size": tuple(patch_size)})
    check_model_request(cfg, pixdim=settings.pixdim, source=str(path), max_bytes=max_bytes)
    model = build_network(cfg)
    arrays = {k: v.numpy() for k, v in state.items()}
    try:
        load_arrays(model, arrays)
    except ModelError as err:
        raise ModelError(f"checkpoint {path}: {err}") from err
    sample_shape = (1, cfg.in_channels, *cfg.patch_size)
    HardwareSettings(devices=device).prepare(model, sample_shape=sample_shape).eval()
    return LoadedModel(model, cfg, settings, max_bytes=max_bytes)


def _check_size(path: Path, max_bytes: int) -> None:
    size = path.stat().st_size if path.is_file() else 0
    if size > max_bytes:
        raise ModelError(
            f"checkpoint {path} is {size / (1 << 30):.3g} GiB, more than the memory cap "
            f"{max_bytes / (1 << 30):.3g} GiB: raise --max-memory if this machine has it"
        )


def _server_weights(path: Path, *, verifier: Verifier | None = None) -> Path | None:
    """The weights file of a server round checkpoint at ``path``, else None (a train ckpt).

    The round is checked before it is returned (:func:`fedmed.security.chain.check_loadable`):
    with ``verifier`` its signature chain, files and pointer; without, its files and pointer
    against its ``meta.json`` where there is one (a warning says it is not verified).
    """
    if path.is_file():
        if path.name != "weights.safetensors":
            return None
        folder = path.parent
    elif not path.is_dir():
        raise ModelError(f"--model {path} does not exist: give a checkpoint file or folder")
    else:
        folder = path
    found: tuple[Path, int, str] | None = None
    if not (folder / "weights.safetensors").is_file():
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        for name in ("best.json", "latest.json"):
            pointer = read_pointer(root / name, error=ModelError)
            if pointer is not None:
                found = (root / name, *pointer)
                break
        else:
            raise ModelError(
                f"--model {path}: no weights.safetensors, best.json or latest.json in it; give "
                "a fedmed train checkpoint (.safetensors) or a run's checkpoints folder"
            )
        folder = root / round_folder_name(found[1])
        if not (folder / "weights.safetensors").is_file():
            raise ModelError(
                f"{found[0]} names round {found[1]} but {folder / 'weights.safetensors'} does "
                "not exist: the checkpoint was deleted; give a round folder that exists"
            )
    if check_loadable(folder, verifier=verifier, pointer=found) is not None and verifier is None:
        logger.warning(
            "checkpoint %s is not verified (no --ca): a re-signed or replaced model would load "
            "as is; pass --ca ca.pem to check who signed it",
            folder,
        )
    return folder / "weights.safetensors"


def _config_from_weights(
    state: dict[str, torch.Tensor], path: Path, patch_size: tuple[int, ...] | None
) -> TrainConfig:
    """Rebuild the architecture from the weights' names and shapes (no metadata there)."""
    try:
        return _architecture(state, patch_size)
    except (KeyError, IndexError, ValueError) as err:  # names or shapes no fedmed net has
        raise ModelError(
            f"checkpoint {path}: the weights are not a fedmed network: their names or shapes "
            f"do not fit ({err})"
        ) from err


def _config_from_plan(plan: PreprocessingPlan, cfg: TrainConfig, *, source: str) -> TrainConfig:
    """The network a federated run's plan names (``lamp_unet`` and its skip-free variant,
    COPLE-Net's group norm), over what the weights' names say (``cfg``)."""
    options = plan.model_options
    try:
        features = options.get("features")
        return dataclasses.replace(
            cfg,
            model=plan.model,
            model_features=tuple(int(f) for f in features) if features else cfg.model_features,
            in_channels=int(options.get("in_channels", cfg.in_channels)),
            out_channels=int(options.get("out_channels", cfg.out_channels)),
            model_norm=str(options.get("norm", cfg.model_norm)),
            lamp_skips="none" if options.get("skip_connections") is False else "carried",
        )
    except (TypeError, ValueError) as err:
        raise ModelError(f"{source}: the plan's model_options are invalid ({err})") from err


def _architecture(
    state: dict[str, torch.Tensor], patch_size: tuple[int, ...] | None
) -> TrainConfig:
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
    raise ValueError("neither COPLE-Net nor U-Net layer names")


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
    if not args.max_memory > 0:
        raise ConfigError(f"--max-memory {args.max_memory:g} must be a positive number of GiB")
    max_bytes = int(args.max_memory * (1 << 30))
    loaded = load_model(
        args.model,
        device=args.device,
        patch_size=_parse_patch(args.patch_size),
        ca=args.ca,
        max_bytes=max_bytes,
    )
    images = input_images(args.input)
    args.output.mkdir(parents=True, exist_ok=True)
    for image in images:
        loaded.check_input(image)
        label_map, meta = predict_image(loaded, image)
        out = save_prediction(
            args.output / image.name, label_map[None].to(torch.uint8), meta, dtype=np.uint8
        )
        logger.info("wrote %s", out)
    print(f"wrote {len(images)} prediction(s) to {args.output}")
    return 0
