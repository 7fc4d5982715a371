"""The federated model: the network a round config describes, its weights as numpy arrays
(what travels between the server and the sites), and the keys a site keeps under FedBN.

Example:
    >>> model = build_network(TrainConfig(model="unet3d", patch_size=(16, 16, 16)), seed=0)
    >>> arrays = model_arrays(model)
    >>> load_arrays(model, arrays)
    >>> local_norm_keys(model)  # its batch-norm statistics
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedmed.errors import ModelError
from fedmed.nets import build_model

if TYPE_CHECKING:
    from fedmed.roundconfig import TrainConfig

__all__ = ["build_network", "load_arrays", "local_norm_keys", "model_arrays", "model_options"]

# SiloBN: only the running statistics of batch norm stay at a site (instance norm, group norm
# and layer norm keep none; their affine weights are shared like every other weight).
_LOCAL_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def model_options(cfg: TrainConfig) -> dict[str, Any]:
    """The :func:`fedmed.nets.build_model` options of ``cfg``'s network (what a checkpoint's
    plan records as ``model_options``).

    Example:
        >>> model_options(TrainConfig(model="lamp_unet", lamp_skips="none"))["skip_connections"]
        False
    """
    options: dict[str, Any] = {"in_channels": cfg.in_channels, "out_channels": cfg.out_channels}
    if cfg.model_features:
        options["features"] = tuple(cfg.model_features)
    if cfg.model == "coplenet":
        options["norm"] = cfg.model_norm
    if cfg.model == "lamp_unet" and cfg.lamp_skips == "none":
        options["skip_connections"] = False
    return options


def build_network(cfg: TrainConfig, *, seed: int | None = None) -> nn.Module:
    """The configured network; ``seed`` fixes its initial weights without touching global RNG."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return build_model(cfg.model, **model_options(cfg))


def local_norm_keys(model: nn.Module) -> frozenset[str]:
    """state_dict keys a site keeps under ``fedbn`` (SiloBN, Andreux et al. 2020): the running
    statistics of every batch-norm layer. The affine weights are shared, so the global model
    is one that the sites trained; a site's own statistics make its personalized model."""
    keys = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for name in _LOCAL_NORM_BUFFERS:
                if getattr(module, name, None) is not None:
                    keys.add(f"{prefix}.{name}" if prefix else name)
    return frozenset(keys)


def model_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state_dict as CPU numpy arrays (copies)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_arrays(
    model: nn.Module, arrays: Mapping[str, np.ndarray], *, partial: bool = False
) -> None:
    """Load numpy ``arrays`` into ``model``; ``partial`` allows a subset (FedBN's shared keys).

    Raises ModelError naming the first unknown key or mismatched shape.
    """
    state = model.state_dict()
    unknown = sorted(set(arrays) - set(state))
    missing = sorted(set(state) - set(arrays))
    if unknown or (missing and not partial):
        raise ModelError(
            f"weights do not fit model {type(model).__name__}: unknown keys {unknown[:3]}, "
            f"missing keys {missing[:3]}: server and site must use the same model settings"
        )
    for key, value in arrays.items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise ModelError(
                f"weight {key!r} has shape {tuple(value.shape)} but the model expects "
                f"{tuple(state[key].shape)}: check model and model-features"
            )
    model.load_state_dict(
        {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}, strict=not partial
    )
