"""Where a site keeps its :class:`~fedmed.siteround.SiteState` between rounds, per run.

The state (SiloBN statistics, SCAFFOLD's control variate, Ditto's personal model, the samples
trained on) belongs to one run, identified by the run's ``run-id`` (the sha256 of its round-0
checkpoint, sent with every round: the same across a resume, different for two fresh runs).
It lives in Flower's ``context.state`` (ArrayRecord ``site-state``, with the run id in a
ConfigRecord beside it) and, when the site has a ``cache-dir``, in
``<cache-dir>/site-state/<run-id[:16]>.safetensors`` so it survives a restart of the site
(encrypted like the cache when ``FEDMED_CACHE_KEY`` is set).

A state of another run is never used. A stored state whose arrays do not fit the model of
this round (other ``model-features``, say) is discarded with a warning naming the mismatch,
and the site starts from the global model.

Example:
    >>> store = StateStore(context, cache_dir="/data/site-A/cache")
    >>> state = store.load("a3f1...", reference=model_arrays(build_network(cfg)))
    >>> store.save(state)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

from fedmed.security.at_rest import read_arrays, write_arrays
from fedmed.security.encryption import load_key
from fedmed.siteround import SiteState

__all__ = ["StateStore", "fits_model"]

logger = logging.getLogger(__name__)

_RECORD = "site-state"
_RUN = "site-state-run"
_RUN_ID = re.compile(r"^[0-9a-f]{16,64}$")


def fits_model(state: SiteState, reference: Mapping[str, np.ndarray]) -> str | None:
    """None when every stored model array has a key and shape of ``reference`` (the round's
    model), else a reason naming the first mismatch. SCAFFOLD's controls are per parameter."""
    for part in ("norm", "control", "personal"):
        for key, value in getattr(state, part).items():
            if key not in reference:
                return f"{part} array {key!r} is not in the model"
            if tuple(value.shape) != tuple(reference[key].shape):
                return (
                    f"{part} array {key!r} has shape {tuple(value.shape)}, the model "
                    f"{tuple(reference[key].shape)}"
                )
    return None


class StateStore:
    """Loads and saves one site's state of a run (see the module docstring)."""

    def __init__(self, context: Context, *, cache_dir: str | Path = "") -> None:
        self.context = context
        self.folder = Path(cache_dir) / "site-state" if cache_dir else None

    def _path(self, run_id: str) -> Path | None:
        return self.folder / f"{run_id[:16]}.safetensors" if self.folder else None

    def load(self, run_id: str, *, reference: Mapping[str, np.ndarray]) -> SiteState:
        """The stored state of run ``run_id`` when it fits ``reference``, else a fresh one."""
        if not _RUN_ID.match(run_id):
            raise ValueError(f"run-id {run_id[:80]!r} is not a sha256 hex digest")
        arrays: Mapping[str, np.ndarray] | None = None
        state = self.context.state
        if (
            _RECORD in state.array_records
            and _RUN in state.config_records
            and state.config_records[_RUN].get("run-id") == run_id
        ):
            arrays = {k: v.numpy() for k, v in state.array_records[_RECORD].items()}
        path = self._path(run_id)
        if arrays is None and path is not None and path.is_file():
            arrays = read_arrays(path, key=load_key(None))
        if arrays is None:
            return SiteState(run_id=run_id)
        loaded = SiteState.from_arrays(run_id, arrays)
        reason = fits_model(loaded, reference)
        if reason is not None:
            logger.warning(
                "the site's state of run %s does not fit this round's model (%s): discarded, "
                "starting from the global model",
                run_id[:12],
                reason,
            )
            return SiteState(run_id=run_id)
        return loaded

    def save(self, site_state: SiteState) -> None:
        """Keep ``site_state`` in ``context.state`` and, with a cache-dir, on disk."""
        arrays = site_state.to_arrays()
        self.context.state[_RECORD] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        self.context.state[_RUN] = ConfigRecord({"run-id": site_state.run_id})
        path = self._path(site_state.run_id)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            contiguous = {k: np.require(v, requirements="C") for k, v in arrays.items()}
            write_arrays(path, contiguous, key=load_key(None))
