"""FedProx's proximal term, ``mu / 2 * ||w - w_global||^2``, on one device or a split model.

FedProx (Li et al., MLSys 2020) adds to each site's loss the squared distance of its trainable
parameters from the global model of the round (the anchor), which keeps sites with different
data from drifting apart. :func:`proximal_anchor` copies the anchor once per round, each
tensor onto its parameter's device, so a LAMP model split over devices pays no copy per step;
:func:`proximal_term` sums the distances on one device.

Example:
    >>> anchor = proximal_anchor(model, global_weights)   # at the start of the round
    >>> loss = task_loss + proximal_term(model, anchor, mu=0.01)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fedmed.errors import ModelError

__all__ = ["proximal_anchor", "proximal_term"]


def proximal_anchor(
    model: nn.Module, global_weights: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """A detached copy of ``global_weights`` (default: ``model``'s own weights now, i.e. the
    global model just loaded) for each parameter of ``model``, on that parameter's device."""
    source = global_weights if global_weights is not None else model.state_dict()
    params = dict(model.named_parameters())
    return {
        name: torch.as_tensor(value).detach().to(params[name].device).clone()
        for name, value in source.items()
        if name in params
    }


def proximal_term(
    model: nn.Module,
    global_weights: Mapping[str, Tensor],
    mu: float,
    *,
    device: torch.device | None = None,
) -> Tensor:
    """FedProx's ``mu / 2 * sum ||w - w_global||^2`` over the trainable parameters of ``model``.

    Each anchor is compared on its parameter's device (no copy when it is there already, as
    ``LocalTrainer`` arranges); the sum is returned on ``device`` (default: the first
    parameter's), so a model split over devices works.
    """
    total: Tensor | None = None
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name not in global_weights:
            raise ModelError(
                f"global weights lack parameter {name!r}: the server model and the site "
                "model differ; use the same architecture on both sides"
            )
        anchor = global_weights[name].to(device=param.device, dtype=param.dtype)
        if anchor.shape != param.shape:
            raise ModelError(
                f"global weight {name!r} has shape {tuple(anchor.shape)} but the model has "
                f"{tuple(param.shape)}: use the same architecture on both sides"
            )
        sq = (param - anchor).pow(2).sum()
        if device is None:
            device = sq.device
        sq = sq.to(device)
        total = sq if total is None else total + sq
    if total is None:
        return torch.zeros((), device=device)
    return 0.5 * mu * total
