"""What follows from the run settings: the model's shape, the loss, the preprocessing plan,
the learning rate of each round, the deadlines, and the parsed path keys.

:class:`DerivedSettings` is the base of :class:`~fedmed.runsettings.settings.RunSettings`: the keys
are its fields, these are its properties. Nothing here reads ``run_config``; each value is
computed from the validated keys, so the server, the simulation and the benches derive it the
same way.

Example:
    >>> s = RunSettings(model="unet3d", num_rounds=2, join_timeout=60, round_timeout=100)
    >>> s.patch_shape, s.loss_name, s.run_deadline
    ((64, 64, 64), 'dice-ce', 2020.0)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from fedmed.errors import ConfigError
from fedmed.plan import PreprocessingPlan

from .rules import FEDPROX_DEFAULT_MU

__all__ = ["DerivedSettings"]


class DerivedSettings:
    """The values :class:`~fedmed.runsettings.settings.RunSettings` derives from its keys."""

    if TYPE_CHECKING:  # the fields of RunSettings these values read
        num_rounds: int
        join_timeout: float
        round_timeout: float
        retry_failed_rounds: int
        strategy: str
        proximal_mu: float
        model: str
        model_features: str
        patch_size: str
        lr: float
        out_dir: str
        max_update_norm: float
        cross_site_evaluation: bool
        local_baselines: bool
        reference_models: str
        evaluation_timeout: float
        secure_aggregation: bool
        loss: str
        lr_schedule: str

        def to_run_config(self) -> dict[str, bool | int | float | str]: ...

    @property
    def features(self) -> tuple[int, ...] | None:
        """``model-features`` parsed, or None for the model's default."""
        return _int_tuple("model-features", self.model_features, allow_empty=True)

    @property
    def spatial_dims(self) -> int:
        """2 for COPLE-Net (slices), 3 for the U-Nets (patches)."""
        return 2 if self.model == "coplenet" else 3

    @property
    def patch_shape(self) -> tuple[int, ...]:
        """The training patch, ``patch-size`` parsed or the model's default."""
        parsed = _int_tuple("patch-size", self.patch_size, allow_empty=True)
        if parsed is None:
            return (96, 96) if self.spatial_dims == 2 else (64, 64, 64)
        if len(parsed) != self.spatial_dims:
            raise ConfigError(
                f"run config key 'patch-size' is {self.patch_size!r} but model {self.model!r} "
                f"needs {self.spatial_dims} sizes: give e.g. "
                f"{','.join(['64'] * self.spatial_dims)!r}"
            )
        levels = len(self.features) if self.features else 5
        factor = 16 if self.spatial_dims == 2 else 2 ** (levels - 1)
        if any(p % factor for p in parsed):
            raise ConfigError(
                f"run config key 'patch-size' is {self.patch_size!r} but model {self.model!r} "
                f"with {levels} levels needs multiples of {factor}: e.g. "
                f"{','.join([str(factor * 4)] * self.spatial_dims)!r}"
            )
        return parsed

    @property
    def loss_name(self) -> str:
        """``loss`` with ``auto`` resolved: nr-dice for COPLE-Net, dice-ce for the U-Nets."""
        if self.loss == "auto":
            return "nr-dice" if self.model == "coplenet" else "dice-ce"
        return self.loss

    @property
    def plan(self) -> PreprocessingPlan:
        """The run's preprocessing plan: ``target-spacing``, ``intensity``, ``hu-window``, the
        patch and the model (its options are added by :func:`fedmed.globalmodel.model_options`
        when the round config is built)."""
        return PreprocessingPlan.from_run_config(
            self.to_run_config(), patch_size=self.patch_shape, model=self.model
        )

    @property
    def update_bound_rule(self) -> str:
        """``default``, ``off`` or ``fixed``: how ``max-update-norm`` bounds an update."""
        if self.secure_aggregation or self.max_update_norm == 0:
            return "off"
        return "default" if self.max_update_norm < 0 else "fixed"

    @property
    def evaluation_deadline(self) -> float:
        """Seconds the end-of-run evaluation may take (``evaluation-timeout`` or derived)."""
        if self.evaluation_timeout > 0:
            return self.evaluation_timeout
        return self.round_timeout * (max(2, self.num_rounds) if self.local_baselines else 2)

    @property
    def effective_proximal_mu(self) -> float:
        """The proximal term the sites use: ``proximal-mu``, or FedProx's default 0.01 when
        the strategy is ``fedprox`` and it is 0 (the same in ``fedmed-sim`` and a deployment).

        Example:
            >>> RunSettings(strategy="fedprox").effective_proximal_mu
            0.01
        """
        if self.strategy == "fedprox" and self.proximal_mu == 0.0:
            return FEDPROX_DEFAULT_MU
        return self.proximal_mu

    @property
    def run_deadline(self) -> float:
        """Seconds the whole run may take, derived from the settings: joining, every round
        with all its attempts (each may wait ``join-timeout`` for sites and ``round-timeout``
        per stage; SecAgg+ has 4 stages), the end-of-run evaluation (twice its deadline: the
        sites' own models, then the models that travel) and 10 minutes for start-up and
        checkpoints. A multi-day study gets a multi-day bound.

        Example:
            >>> RunSettings(num_rounds=2, join_timeout=60, round_timeout=100).run_deadline
            2020.0
        """
        attempts = self.retry_failed_rounds + 1
        stages = 4 if self.secure_aggregation else 1
        per_round = attempts * (self.join_timeout + stages * self.round_timeout)
        evaluation = 2 * self.evaluation_deadline if self.cross_site_evaluation else 0.0
        return self.join_timeout + self.num_rounds * per_round + evaluation + 600.0

    @property
    def reference_model_paths(self) -> dict[str, Path]:
        """``reference-models`` parsed: label -> checkpoint path."""
        if not self.reference_models.strip():
            return {}
        try:
            parsed = json.loads(self.reference_models)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"run config key 'reference-models' is not JSON: {self.reference_models[:80]!r}"
                ': give {"centralized": "/path/model.safetensors"}'
            ) from err
        if not isinstance(parsed, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()
        ):
            raise ConfigError(
                "run config key 'reference-models' must map labels to checkpoint paths, got "
                f"{self.reference_models[:80]!r}"
            )
        return {k: Path(v) for k, v in parsed.items()}

    def round_lr(self, server_round: int) -> float:
        """The site learning rate of ``server_round`` under ``lr-schedule``.

        Cosine annealing over the run (Loshchilov & Hutter 2017, one cycle, no restart):
        round 1 trains at ``lr`` and round R at ``lr * (1 + cos(pi (R - 1) / R)) / 2``, never
        0. Round 0 (the initial model) and rounds past ``num-rounds`` (the end-of-run local
        training: fine-tuning, local-only baselines) get ``lr``.

        Example:
            >>> s = RunSettings(num_rounds=4, lr=0.01, lr_schedule="cosine")
            >>> [round(s.round_lr(r), 5) for r in (1, 2, 3, 4)]
            [0.01, 0.00854, 0.005, 0.00146]
        """
        if self.lr_schedule == "constant" or not 1 <= server_round <= self.num_rounds:
            return self.lr
        return self.lr * (1.0 + math.cos(math.pi * (server_round - 1) / self.num_rounds)) / 2.0

    @property
    def out_path(self) -> Path:
        """``out-dir`` as a path."""
        return Path(self.out_dir)


def _int_tuple(key: str, text: str, *, allow_empty: bool) -> tuple[int, ...] | None:
    if not text.strip():
        if allow_empty:
            return None
        raise ConfigError(f"run config key {key!r} is empty: give comma-separated integers")
    try:
        parsed = tuple(int(part) for part in text.split(","))
    except ValueError as err:
        raise ConfigError(
            f"run config key {key!r} is {text!r}: give comma-separated integers like '16,32,64'"
        ) from err
    if any(v < 1 for v in parsed):
        raise ConfigError(f"run config key {key!r} is {text!r}: every size must be >= 1")
    return parsed
