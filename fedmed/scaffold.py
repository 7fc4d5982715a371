"""SCAFFOLD's control variates (Karimireddy et al., ICML 2020): drift correction for non-IID sites.

The server keeps a control variate ``c`` and each site its own ``c_i`` (one array per trainable
parameter, zeros at the start). A site trains with every gradient corrected to
``g - c_i + c`` and afterwards sets ``c_i`` to the mean of the *uncorrected* gradients it saw
(the paper's option II, ``c_i - c + (x - y) / (K lr)``, is exactly that mean for plain SGD;
taking the mean directly keeps it right for Adam too), and sends ``delta_c_i = c_i_new - c_i``
with its model. The server moves ``c`` by ``sum(delta_c_i) / N`` over the ``N`` sites of the
federation, and the model by the usual (weighted) average.

:class:`GradientCorrection` does the site's part on any ``nn.Module`` with gradient hooks, so
the training loop itself does not change. Arrays travel beside the model under the prefix
:data:`PREFIX` (``scaffold/<parameter name>``): the server's ``c`` in the train message, the
site's ``delta_c_i`` in the reply, with the same keys, shapes and dtypes.

Example:
    >>> model = torch.nn.Linear(2, 1)
    >>> zeros = zero_controls(model)
    >>> with GradientCorrection(model, server=zeros, site=zeros) as correction:
    ...     model(torch.ones(1, 2)).sum().backward()
    >>> sorted(correction.new_site_control())
    ['bias', 'weight']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import TracebackType

import numpy as np
import torch
from torch import nn

__all__ = [
    "PREFIX",
    "GradientCorrection",
    "join_controls",
    "split_controls",
    "update_server_control",
    "zero_controls",
]

PREFIX = "scaffold/"
Arrays = dict[str, np.ndarray]


def zero_controls(model: nn.Module) -> Arrays:
    """A zero control variate for every trainable parameter of ``model`` (float32)."""
    return {
        name: np.zeros(tuple(p.shape), np.float32)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def join_controls(arrays: Mapping[str, np.ndarray], controls: Mapping[str, np.ndarray]) -> Arrays:
    """``arrays`` plus ``controls`` under :data:`PREFIX` (one packed payload on the wire)."""
    return {**arrays, **{PREFIX + k: v for k, v in controls.items()}}


def split_controls(arrays: Mapping[str, np.ndarray]) -> tuple[Arrays, Arrays]:
    """``(model arrays, controls)`` of what :func:`join_controls` made."""
    model = {k: v for k, v in arrays.items() if not k.startswith(PREFIX)}
    controls = {k[len(PREFIX) :]: v for k, v in arrays.items() if k.startswith(PREFIX)}
    return model, controls


def update_server_control(
    server: Mapping[str, np.ndarray], deltas: list[Mapping[str, np.ndarray]], *, num_sites: int
) -> Arrays:
    """``c + sum(delta_c_i) / num_sites`` (the paper's global step size 1)."""
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    out: Arrays = {}
    for key, value in server.items():
        total = value.astype(np.float64)
        for delta in deltas:
            total = total + delta[key].astype(np.float64) / num_sites
        out[key] = total.astype(value.dtype)
    return out


class GradientCorrection:
    """Adds ``server - site`` to every gradient of ``model`` while active, and keeps the mean of
    the uncorrected gradients (the site's next control variate).

    Example:
        >>> with GradientCorrection(model, server=c, site=c_i) as correction:
        ...     trainer.fit(batches)
        >>> delta = correction.site_delta()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        server: Mapping[str, np.ndarray],
        site: Mapping[str, np.ndarray],
    ) -> None:
        self.model = model
        self.site = {k: np.asarray(v, np.float32) for k, v in site.items()}
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        missing = sorted(set(self._params) - set(server)) + sorted(set(self._params) - set(site))
        if missing:
            raise ValueError(f"control variates lack parameters {missing[:3]}")
        self._shift = {
            n: torch.as_tensor(np.asarray(server[n], np.float32) - self.site[n], device=p.device)
            for n, p in self._params.items()
        }
        self._sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self._params.items()}
        self._counts = dict.fromkeys(self._params, 0)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            self._sums[name] += grad.detach().float()
            self._counts[name] += 1
            return grad + self._shift[name].to(grad.dtype)

        return hook

    def __enter__(self) -> GradientCorrection:
        self._handles = [p.register_hook(self._hook(n)) for n, p in self._params.items()]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def new_site_control(self) -> Arrays:
        """The mean uncorrected gradient per parameter; the old control where none was seen."""
        return {
            n: (self._sums[n] / self._counts[n]).cpu().numpy() if self._counts[n] else self.site[n]
            for n in self._params
        }

    def site_delta(self) -> Arrays:
        """``new_site_control() - site``: what the site sends the server."""
        new = self.new_site_control()
        return {n: (new[n] - self.site[n]).astype(np.float32) for n in self._params}
