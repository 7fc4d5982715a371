"""The round config: what the server sends a site each round, and all a site needs to train.

:class:`TrainConfig` travels as a flat Flower ``ConfigRecord`` (:meth:`TrainConfig.to_config`,
parsed back by :meth:`TrainConfig.from_config`): model, patch, epochs/steps, learning rate,
FedProx ``mu``, FedBN, the loss (``dice``, ``dice-ce``, ``nr-dice`` with COPLE-Net's
self-ensembling) and the preprocessing (:attr:`TrainConfig.plan`: target spacing, CT window or
MR z-score). :func:`trainer_config` gives the round's local trainer settings
(:class:`fedmed.train.TrainerConfig`); :mod:`fedmed.globalmodel` builds the network it describes.

The server builds it from the run settings (:func:`fedmed.server.federation.train_config`);
a site refuses a round config it cannot read with a ConfigError naming the key.

Example:
    >>> cfg = TrainConfig(model="coplenet", patch_size=(32, 32), lr=0.01)
    >>> TrainConfig.from_config(cfg.to_config()) == cfg
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fedmed.errors import ConfigError
from fedmed.globalmodel import model_options
from fedmed.losses import LOSSES, NR_DENOMINATORS
from fedmed.metrics import DEFAULT_NSD_TOLERANCE_MM
from fedmed.pipeline import HU_WINDOW, INTENSITIES
from fedmed.plan import PreprocessingPlan
from fedmed.train import TrainerConfig

__all__ = ["AGGREGATION_WEIGHTS", "LAMP_SKIPS", "TrainConfig", "trainer_config"]

AGGREGATION_WEIGHTS = ("cases", "voxels")
LAMP_SKIPS = ("carried", "none")
# Comma-separated tuples in the round config, and the type of their entries.
_TUPLES = {"model_features": int, "patch_size": int, "target_spacing": float, "hu_window": float}


@dataclass(frozen=True)
class TrainConfig:
    """A round's instructions to a site; travels as a flat ``ConfigRecord`` (``to_config``).

    The last fields are the run settings of the same names (:mod:`fedmed.runsettings.settings`):
    ``loss`` (``auto`` = the model's default: ``nr-dice`` for COPLE-Net, ``dice-ce`` for the
    U-Nets), ``nr_gamma``, ``nr_denominator``, ``self_ensembling`` with ``ema_decay``,
    ``lamp_skips`` (``none``: LAMP's skip-free variant), and the preprocessing
    ``target_spacing`` (mm, ``None`` = native), ``intensity`` and ``hu_window`` (see
    :attr:`plan`).

    Example:
        >>> cfg = TrainConfig(lr=0.01, proximal_mu=0.1)
        >>> TrainConfig.from_config(cfg.to_config()) == cfg
        True
    """

    model: str = "coplenet"
    model_features: tuple[int, ...] | None = None
    in_channels: int = 1
    out_channels: int = 2
    patch_size: tuple[int, ...] = (96, 96)
    local_epochs: int = 1
    local_steps: int = 0
    lr: float = 1e-3
    batch_size: int = 4
    proximal_mu: float = 0.0
    fedbn: bool = False
    val_fraction: float = 0.2
    seed: int = 0
    server_round: int = 0
    run_id: str = ""
    aggregation_weight: str = "cases"
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM
    ditto_lambda: float = 0.0
    scaffold: bool = False
    model_norm: str = "batch"
    loss: str = "auto"
    nr_gamma: float = 1.5
    nr_denominator: str = "linear"
    self_ensembling: bool = False
    ema_decay: float = 0.99
    lamp_skips: str = "carried"
    target_spacing: tuple[float, ...] | None = None
    intensity: str = "ct-window"
    hu_window: tuple[float, ...] = HU_WINDOW

    @property
    def spatial_dims(self) -> int:
        """2 for COPLE-Net, 3 for the U-Nets."""
        return 2 if self.model == "coplenet" else 3

    @property
    def loss_name(self) -> str:
        """``loss`` with ``auto`` resolved: ``nr-dice`` for COPLE-Net (its paper's loss),
        ``dice-ce`` for the U-Nets."""
        if self.loss == "auto":
            return "nr-dice" if self.model == "coplenet" else "dice-ce"
        return self.loss

    @property
    def plan(self) -> PreprocessingPlan:
        """The preprocessing this round's model is trained with (spacing, intensity, patch,
        model): what every checkpoint records and what the site pipeline runs
        (:meth:`~fedmed.plan.PreprocessingPlan.pipeline_settings`)."""
        return PreprocessingPlan.from_run_config(
            self.to_config(),
            patch_size=self.patch_size,
            model=self.model,
            model_options=model_options(self),
            source="round config",
        )

    def to_config(self) -> dict[str, int | float | str | bool]:
        """Flat kebab-case values for a Flower ``ConfigRecord``."""
        out: dict[str, int | float | str | bool] = {}
        for name, value in asdict(self).items():
            key = name.replace("_", "-")
            if name in _TUPLES:
                value = ",".join(str(v) for v in value) if value else ""
            out[key] = value
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainConfig:
        """Parse :meth:`to_config`'s output; ConfigError names a missing or bad key."""
        values: dict[str, Any] = {}
        for name, default in asdict(cls()).items():
            key = name.replace("_", "-")
            if key not in config:
                raise ConfigError(f"round config lacks {key!r}: server and site versions differ?")
            value = config[key]
            try:
                if name in _TUPLES:
                    kind = _TUPLES[name]
                    parsed = tuple(kind(v) for v in str(value).split(",") if v.strip())
                    value = parsed or None
                elif isinstance(default, bool):
                    value = bool(value)
                elif isinstance(default, int):
                    value = int(value)
                elif isinstance(default, float):
                    value = float(value)
                elif isinstance(default, str):
                    value = str(value)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"round config {key!r} is invalid: {value!r}") from err
            values[name] = value
        for key in ("patch_size", "hu_window"):
            if values.get(key) is None:
                raise ConfigError(f"round config {key.replace('_', '-')!r} is empty")
        for key, known in (
            ("loss", ("auto", *LOSSES)),
            ("nr_denominator", NR_DENOMINATORS),
            ("lamp_skips", LAMP_SKIPS),
            ("intensity", INTENSITIES),
        ):
            if values[key] not in known:
                raise ConfigError(
                    f"round config {key.replace('_', '-')!r} is {values[key]!r}: the site knows "
                    f"{', '.join(known)}; update fedmed at the site"
                )
        if values["aggregation_weight"] not in AGGREGATION_WEIGHTS:
            raise ConfigError(
                f"round config 'aggregation-weight' is {values['aggregation_weight']!r}: the "
                f"site knows {', '.join(AGGREGATION_WEIGHTS)}; update fedmed at the site"
            )
        return cls(**values)


def trainer_config(cfg: TrainConfig) -> TrainerConfig:
    """The :class:`fedmed.train.TrainerConfig` of a round: its loss (``auto``: COPLE-Net trains
    with the noise-robust Dice, the U-Nets with Dice + cross-entropy), self-ensembling and
    optimizer settings (``dataclasses.replace`` changes the rest)."""
    return TrainerConfig(
        epochs=cfg.local_epochs,
        steps=cfg.local_steps or None,
        lr=cfg.lr,
        proximal_mu=cfg.proximal_mu,
        loss=cfg.loss_name,  # type: ignore[arg-type]  # checked by TrainerConfig
        gamma=cfg.nr_gamma,
        nr_denominator=cfg.nr_denominator,  # type: ignore[arg-type]
        self_ensembling=cfg.self_ensembling,
        ema_alpha=cfg.ema_decay,
    )
