"""The federation's run settings: every ``run_config`` key, validated once into a typed object.

The deployment passes the ``[app]`` table of ``configs/federation.toml`` verbatim as Flower's
``run_config``; :meth:`RunSettings.from_run_config` is the only place that reads it. Every key
is optional (Flower's ``run_simulation`` passes an empty ``run_config``); unknown keys are
refused so a typo never silently falls back to a default.

Keys (TOML type, default):

==========================  =======  ===========  ==============================================
key                         type     default      meaning
==========================  =======  ===========  ==============================================
``num-rounds``              int      3            federated rounds to run (>= 1)
``min-sites``               int      2            valid replies a round needs to count (>= 1)
``sites-per-round``         int      0            sites asked to train each round, sampled from
                                                  the connected ones (0 = all; else >=
                                                  ``min-sites``; see :mod:`.sampling`)
``join-timeout``            float    300          seconds to wait for ``min-sites`` sites to be
                                                  connected before a FederationError
``round-timeout``           float    600          seconds a round waits for replies
``retry-failed-rounds``     int      2            retries of a round with too few valid replies
``strategy``                str      "fedavg"     fedavg, fedprox, fedadam, fedyogi, fedmedian,
                                                  trimmed-mean, scaffold (control variates at
                                                  the server and each site, Karimireddy 2020)
``fedbn``                   bool     false        keep the normalization *statistics* at each
                                                  site (SiloBN: affine weights are shared, so
                                                  the global model exists; see fedmed.task)
``aggregation-weight``      str      "cases"      what ``num-examples`` counts: training cases,
                                                  or ``voxels`` (the training images' volume in
                                                  mm^3, i.e. voxels at 1 mm isotropic)
``max-site-cases``          int      100000       the most training cases a site may announce
``proximal-mu``             float    0.0          FedProx proximal term mu (sent to the sites):
                                                  > 0 adds it with any strategy; 0 with
                                                  ``fedprox`` means 0.01
``server-lr``               float    0.01         FedAdam/FedYogi server learning rate (eta)
``server-beta1``            float    0.9          FedAdam/FedYogi first-moment decay
``server-beta2``            float    0.99         FedAdam/FedYogi second-moment decay
``server-tau``              float    0.001        FedAdam/FedYogi adaptivity (epsilon)
``trim-fraction``           float    0.2          trimmed-mean: fraction cut at each end, [0, 0.5)
``model``                   str      "coplenet"   coplenet, unet3d, lamp_unet
``model-features``          str      ""           comma-separated channels per level ("" =
                                                  the model's default)
``in-channels``             int      1            image channels
``out-channels``            int      2            classes including background
``patch-size``              str      ""           comma-separated training patch ("" = model
                                                  default: 2D "96,96", 3D "64,64,64")
``local-epochs``            int      1            local epochs per round (>= 1)
``local-steps``             int      0            cap on optimizer steps per round (0 = no cap)
``lr``                      float    0.001        site learning rate
``batch-size``              int      4            site batch size
``val-fraction``            float    0.2          share of a site's cases held for validation
``data-dir``                str      ""           server held-out folder ("" = none; then
                                                  ``best`` follows the sites' mean val Dice)
``out-dir``                 str      "fedmed-run" checkpoints, metrics.jsonl, report.md
``max-update-norm``         float    -1           L2 bound on a site's update: -1 = the default
                                                  rule (fedmed.server.validation), 0 = none
``poll-interval``           float    0.1          seconds between reply polls
``seed``                    int      0            seeds the initial model and site splits
``nsd-tolerance-mm``        float    2.0          normalized surface Dice tolerance (mm)
``cross-site-evaluation``   bool     true         at the end: every model on every site's
                                                  validation split and the held-out set
``finetune-epochs``         int      1            end of run: local fine-tuning of the final
                                                  global model at each site (0 = none)
``ditto-lambda``            float    0.0          Ditto: each site also trains a personal model
                                                  tied to the global one by this weight (0 = off)
``local-baselines``         bool     false        end of run: each site trains a local-only
                                                  model with the samples it used in the run
``reference-models``        str      ""           JSON {label: safetensors path} of models the
                                                  end-of-run evaluation includes (centralized)
``evaluation-timeout``      float    0            seconds for the end-of-run evaluation (0 =
                                                  round-timeout x 2, x num-rounds with
                                                  local-baselines)
``signing-dir``             str      ""           folder with server.key + server.pem (``fedmed
                                                  certs``): sign global models and checkpoints
``dp-mode``                 str      ""           record (DP-SGD per patient at each site),
                                                  site (each update clipped and noised) or off;
                                                  "" = site when dp-clip-norm > 0, else off
``dp-clip-norm``            float    0.0          L2 bound: per patient's gradient (record) or
                                                  per site update (site); see
                                                  :mod:`fedmed.security.dp`
``dp-noise-multiplier``     float    0.0          noise std / clip norm
``dp-delta``                float    1e-5         delta of the reported (epsilon, delta)
``dp-max-epsilon``          float    0.0          the epsilon the coordinator asks each site to
                                                  stay within for this run (0 = none; a site's
                                                  own ``max-epsilon`` wins)
``dp-adjacency``            str      ""           site mode: replace-one (default) or
                                                  add-remove; record mode: add-remove
``dp-patients-per-step``    float    8.0          record mode: expected patients per DP-SGD step
``model-norm``              str      "batch"      COPLE-Net's normalization: batch or group
                                                  (group for record-level DP)
``secure-aggregation``      bool     false        SecAgg+: the server sees only the sum of the
                                                  sites' updates (needs min-sites >= 3 and a
                                                  mean-based strategy; see :mod:`.secagg`)
``secagg-clip-range``       float    8.0          SecAgg+: each weighted update value is clipped
                                                  to +-this before quantization
``secagg-max-weight``       float    1000         SecAgg+: largest site weight (training
                                                  samples) representable without overflow
``loss``                    str      "auto"       dice, dice-ce or nr-dice (COPLE-Net's noise-
                                                  robust Dice); auto = nr-dice for coplenet,
                                                  dice-ce for the U-Nets (see fedmed.losses)
``nr-gamma``                float    1.5          nr-dice exponent, in [1, 2] (lower = more
                                                  robust to noisy labels)
``nr-denominator``          str      "linear"     nr-dice denominator: linear (the reference
                                                  code's sum(p + g)) or squared (the paper's
                                                  sum(p^2 + g^2), Dice-like at gamma 2)
``self-ensembling``         bool     false        COPLE-Net's adaptive self-ensembling (an EMA
                                                  teacher; needs loss nr-dice, not record DP)
``ema-decay``               float    0.99         self-ensembling: the teacher's EMA decay
``lamp-skips``              str      "carried"    lamp_unet: carried (skips through the
                                                  stages) or none (the paper's skip-free
                                                  parallel U-Net; other weight shapes)
``target-spacing``          str      "native"     voxel size (mm) every scan is resampled to,
                                                  "x,y,z", or native (each scan's own)
``intensity``               str      "ct-window"  ct-window (hu-window mapped to [0, 1]), zscore
                                                  or zscore-nonzero (MR; per volume)
``hu-window``               str      "-1000,400"  ct-window: "low,high" in HU
``lr-schedule``             str      "constant"   the site learning rate over the rounds:
                                                  constant, or cosine (round r of R trains at
                                                  lr * (1 + cos(pi (r - 1) / R)) / 2; the
                                                  centralized baseline follows it per round)
==========================  =======  ===========  ==============================================

The preprocessing keys (``target-spacing``, ``intensity``, ``hu-window``) with ``patch-size``
and the model make the run's :class:`~fedmed.plan.PreprocessingPlan` (:attr:`RunSettings.plan`):
the sites preprocess with it, the server's held-out evaluation too, and every round checkpoint
records it so ``fedmed infer`` prepares new scans the same way.

Example:
    >>> settings = RunSettings.from_run_config({"num-rounds": 5, "strategy": "fedprox",
    ...                                         "proximal-mu": 0.01})
    >>> settings.num_rounds, settings.proximal_mu
    (5, 0.01)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmed.errors import ConfigError
from fedmed.losses import LOSSES, NR_DENOMINATORS
from fedmed.plan import PreprocessingPlan
from fedmed.security.guard import dp_params

__all__ = [
    "AGGREGATION_WEIGHTS",
    "LR_SCHEDULES",
    "MODELS",
    "SECAGG_MIN_SITES",
    "SECAGG_STRATEGIES",
    "STRATEGIES",
    "RunSettings",
]

logger = logging.getLogger(__name__)

STRATEGIES = (
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedmedian",
    "trimmed-mean",
    "scaffold",
)
AGGREGATION_WEIGHTS = ("cases", "voxels")
MODELS = ("coplenet", "unet3d", "lamp_unet")
# Strategies that need only the weighted mean of the updates: the one thing SecAgg+ reveals.
SECAGG_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
SECAGG_MIN_SITES = 3

# Keys that do not change the training trajectory: a run may be resumed with other values.
_RESUMABLE_KEYS = frozenset(
    {
        "num_rounds",
        "join_timeout",
        "round_timeout",
        "retry_failed_rounds",
        "poll_interval",
        "out_dir",
        "data_dir",
        "min_sites",
        "max_update_norm",
        "signing_dir",
        "dp_max_epsilon",
        "max_site_cases",
        "nsd_tolerance_mm",
        "cross_site_evaluation",
        "finetune_epochs",
        "local_baselines",
        "reference_models",
        "evaluation_timeout",
    }
)
# Keys that shape training but came later: left out of the identity hash at their default, so
# runs from before they existed keep their hash (and stay resumable).
_NEW_TRAINING_KEYS = {
    "aggregation-weight": "cases",
    "ditto-lambda": 0.0,
    "dp-mode": "",
    "dp-adjacency": "",
    "dp-patients-per-step": 8.0,
    "model-norm": "batch",
    "loss": "auto",
    "nr-gamma": 1.5,
    "nr-denominator": "linear",
    "self-ensembling": False,
    "ema-decay": 0.99,
    "lamp-skips": "carried",
    "target-spacing": "native",
    "intensity": "ct-window",
    "hu-window": "-1000,400",
    "lr-schedule": "constant",
}
MODEL_NORMS = ("batch", "group")
FEDPROX_DEFAULT_MU = 0.01
LAMP_SKIPS = ("carried", "none")
LR_SCHEDULES = ("constant", "cosine")


def _meta(key: str, kind: type, **limits: float) -> dict[str, Any]:
    return {"key": key, "kind": kind, **limits}


@dataclass(frozen=True)
class RunSettings:
    """Validated federation settings; see the module docstring for each key.

    Example:
        >>> RunSettings().strategy
        'fedavg'
        >>> RunSettings(model="unet3d").patch_shape
        (64, 64, 64)
    """

    num_rounds: int = field(default=3, metadata=_meta("num-rounds", int, min=1))
    min_sites: int = field(default=2, metadata=_meta("min-sites", int, min=1))
    sites_per_round: int = field(default=0, metadata=_meta("sites-per-round", int, min=0))
    join_timeout: float = field(default=300.0, metadata=_meta("join-timeout", float, gt=0))
    round_timeout: float = field(default=600.0, metadata=_meta("round-timeout", float, gt=0))
    retry_failed_rounds: int = field(default=2, metadata=_meta("retry-failed-rounds", int, min=0))
    strategy: str = field(default="fedavg", metadata=_meta("strategy", str))
    fedbn: bool = field(default=False, metadata=_meta("fedbn", bool))
    aggregation_weight: str = field(default="cases", metadata=_meta("aggregation-weight", str))
    max_site_cases: int = field(default=100_000, metadata=_meta("max-site-cases", int, min=1))
    proximal_mu: float = field(default=0.0, metadata=_meta("proximal-mu", float, min=0))
    server_lr: float = field(default=0.01, metadata=_meta("server-lr", float, gt=0))
    server_beta1: float = field(default=0.9, metadata=_meta("server-beta1", float, min=0, lt=1))
    server_beta2: float = field(default=0.99, metadata=_meta("server-beta2", float, min=0, lt=1))
    server_tau: float = field(default=1e-3, metadata=_meta("server-tau", float, gt=0))
    trim_fraction: float = field(default=0.2, metadata=_meta("trim-fraction", float, min=0, lt=0.5))
    model: str = field(default="coplenet", metadata=_meta("model", str))
    model_features: str = field(default="", metadata=_meta("model-features", str))
    in_channels: int = field(default=1, metadata=_meta("in-channels", int, min=1))
    out_channels: int = field(default=2, metadata=_meta("out-channels", int, min=2))
    patch_size: str = field(default="", metadata=_meta("patch-size", str))
    local_epochs: int = field(default=1, metadata=_meta("local-epochs", int, min=1))
    local_steps: int = field(default=0, metadata=_meta("local-steps", int, min=0))
    lr: float = field(default=1e-3, metadata=_meta("lr", float, gt=0))
    batch_size: int = field(default=4, metadata=_meta("batch-size", int, min=1))
    val_fraction: float = field(default=0.2, metadata=_meta("val-fraction", float, gt=0, lt=1))
    data_dir: str = field(default="", metadata=_meta("data-dir", str))
    out_dir: str = field(default="fedmed-run", metadata=_meta("out-dir", str))
    max_update_norm: float = field(default=-1.0, metadata=_meta("max-update-norm", float, min=-1))
    poll_interval: float = field(default=0.1, metadata=_meta("poll-interval", float, gt=0))
    seed: int = field(default=0, metadata=_meta("seed", int))
    nsd_tolerance_mm: float = field(default=2.0, metadata=_meta("nsd-tolerance-mm", float, gt=0))
    cross_site_evaluation: bool = field(default=True, metadata=_meta("cross-site-evaluation", bool))
    finetune_epochs: int = field(default=1, metadata=_meta("finetune-epochs", int, min=0))
    ditto_lambda: float = field(default=0.0, metadata=_meta("ditto-lambda", float, min=0))
    local_baselines: bool = field(default=False, metadata=_meta("local-baselines", bool))
    reference_models: str = field(default="", metadata=_meta("reference-models", str))
    evaluation_timeout: float = field(
        default=0.0, metadata=_meta("evaluation-timeout", float, min=0)
    )
    signing_dir: str = field(default="", metadata=_meta("signing-dir", str))
    dp_clip_norm: float = field(default=0.0, metadata=_meta("dp-clip-norm", float, min=0))
    dp_noise_multiplier: float = field(
        default=0.0, metadata=_meta("dp-noise-multiplier", float, min=0)
    )
    dp_delta: float = field(default=1e-5, metadata=_meta("dp-delta", float, gt=0, lt=1))
    dp_max_epsilon: float = field(default=0.0, metadata=_meta("dp-max-epsilon", float, min=0))
    dp_mode: str = field(default="", metadata=_meta("dp-mode", str))
    dp_adjacency: str = field(default="", metadata=_meta("dp-adjacency", str))
    dp_patients_per_step: float = field(
        default=8.0, metadata=_meta("dp-patients-per-step", float, gt=0)
    )
    model_norm: str = field(default="batch", metadata=_meta("model-norm", str))
    secure_aggregation: bool = field(default=False, metadata=_meta("secure-aggregation", bool))
    secagg_clip_range: float = field(default=8.0, metadata=_meta("secagg-clip-range", float, gt=0))
    secagg_max_weight: float = field(
        default=1000.0, metadata=_meta("secagg-max-weight", float, gt=0)
    )
    loss: str = field(default="auto", metadata=_meta("loss", str))
    nr_gamma: float = field(default=1.5, metadata=_meta("nr-gamma", float, min=1, max=2))
    nr_denominator: str = field(default="linear", metadata=_meta("nr-denominator", str))
    self_ensembling: bool = field(default=False, metadata=_meta("self-ensembling", bool))
    ema_decay: float = field(default=0.99, metadata=_meta("ema-decay", float, min=0, lt=1))
    lamp_skips: str = field(default="carried", metadata=_meta("lamp-skips", str))
    target_spacing: str = field(default="native", metadata=_meta("target-spacing", str))
    intensity: str = field(default="ct-window", metadata=_meta("intensity", str))
    hu_window: str = field(default="-1000,400", metadata=_meta("hu-window", str))
    lr_schedule: str = field(default="constant", metadata=_meta("lr-schedule", str))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_value(f, getattr(self, f.name))
        if self.target_spacing.strip().lower() in ("", "native"):  # one spelling, one hash
            object.__setattr__(self, "target_spacing", "native")
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"run config key 'strategy' is {self.strategy!r}: "
                f"use one of {', '.join(STRATEGIES)}"
            )
        if self.model not in MODELS:
            raise ConfigError(
                f"run config key 'model' is {self.model!r}: use one of {', '.join(MODELS)}"
            )
        if self.aggregation_weight not in AGGREGATION_WEIGHTS:
            raise ConfigError(
                f"run config key 'aggregation-weight' is {self.aggregation_weight!r}: use one of "
                f"{', '.join(AGGREGATION_WEIGHTS)}"
            )
        if -1.0 < self.max_update_norm < 0.0:
            raise ConfigError(
                f"run config key 'max-update-norm' is {self.max_update_norm}: give -1 (the "
                "default rule), 0 (no bound) or a positive L2 norm"
            )
        _ = self.reference_model_paths  # parse now so errors surface at construction
        if self.model_norm not in MODEL_NORMS:
            raise ConfigError(
                f"run config key 'model-norm' is {self.model_norm!r}: use one of "
                f"{', '.join(MODEL_NORMS)}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"run config key 'lr-schedule' is {self.lr_schedule!r}: use one of "
                f"{', '.join(LR_SCHEDULES)}"
            )
        if self.strategy == "scaffold" and self.dp_clip_norm > 0:
            raise ConfigError(
                "run config key 'strategy' is 'scaffold' but DP is on (dp-clip-norm > 0): the "
                "sites' control variates would leave them without noise; use fedavg or fedprox "
                "with DP"
            )
        if 0 < self.sites_per_round < self.min_sites:
            raise ConfigError(
                f"run config key 'sites-per-round' is {self.sites_per_round} but min-sites is "
                f"{self.min_sites}: a round needs min-sites replies, so sample at least that "
                "many (raise sites-per-round, lower min-sites, or 0 = all sites)"
            )
        if self.secure_aggregation:
            self._check_secure_aggregation()
        _ = self.features, self.patch_shape  # parse now so errors surface at construction
        self._check_training_recipe()
        dp = dp_params(self)  # DP keys checked together (noise needs a clip norm)
        if dp.mode == "record" and self.self_ensembling:
            raise ConfigError(
                "run config key 'self-ensembling' is true but dp-mode is 'record': DP-SGD "
                "trains on clipped per-patient gradients of the loss alone, without the EMA "
                "teacher; set self-ensembling = false, or use dp-mode 'site'"
            )
        if dp.mode == "record" and self.model == "coplenet" and self.model_norm == "batch":
            raise ConfigError(
                "run config key 'dp-mode' is 'record' but COPLE-Net uses batch norm, whose "
                "statistics mix the patients of a batch (DP-SGD needs per-patient gradients): "
                "set model-norm = 'group'"
            )
        if self.strategy != "fedprox" and self.proximal_mu > 0.0:
            logger.info(
                "proximal-mu %s with strategy %r: the sites add the proximal term",
                self.proximal_mu,
                self.strategy,
            )

    def _check_training_recipe(self) -> None:
        """The loss, LAMP and preprocessing keys (each error names its key)."""
        choices = (
            ("loss", self.loss, ("auto", *LOSSES)),
            ("nr-denominator", self.nr_denominator, NR_DENOMINATORS),
            ("lamp-skips", self.lamp_skips, LAMP_SKIPS),
        )
        for key, value, known in choices:
            if value not in known:
                raise ConfigError(
                    f"run config key {key!r} is {value!r}: use one of {', '.join(known)}"
                )
        if self.self_ensembling and self.loss_name != "nr-dice":
            raise ConfigError(
                f"run config key 'self-ensembling' is true but the loss is {self.loss_name!r}: "
                "COPLE-Net's self-ensembling builds on the noise-robust Dice; set loss = "
                "'nr-dice' (or self-ensembling = false)"
            )
        if self.lamp_skips != "carried" and self.model != "lamp_unet":
            raise ConfigError(
                f"run config key 'lamp-skips' is {self.lamp_skips!r} but model is "
                f"{self.model!r}: the skip-free variant is LAMP's; use model = 'lamp_unet' or "
                "lamp-skips = 'carried'"
            )
        _ = self.plan  # target-spacing, intensity and hu-window: errors name the key

    def _check_secure_aggregation(self) -> None:
        if self.min_sites < SECAGG_MIN_SITES:
            raise ConfigError(
                f"run config key 'secure-aggregation' is true but min-sites is {self.min_sites}: "
                f"SecAgg+ needs at least {SECAGG_MIN_SITES} sites in every round (with 2, each "
                "site could subtract its own update from the sum and learn the other's); set "
                f"min-sites >= {SECAGG_MIN_SITES} with that many sites, or secure-aggregation = "
                "false"
            )
        if self.strategy not in SECAGG_STRATEGIES:
            raise ConfigError(
                f"run config key 'strategy' is {self.strategy!r}, which needs each site's "
                "update, but secure-aggregation shows the server only their sum: use one of "
                f"{', '.join(SECAGG_STRATEGIES)}, or secure-aggregation = false"
            )
        if self.strategy == "scaffold":
            raise ConfigError(
                "run config key 'strategy' is 'scaffold', whose control variates the server "
                "must see per site, but secure-aggregation shows only sums: use fedavg or "
                "fedprox, or secure-aggregation = false"
            )
        if self.max_update_norm > 0:
            raise ConfigError(
                "run config key 'max-update-norm' needs each site's update, but "
                "secure-aggregation shows the server only their sum: set max-update-norm = 0 "
                "(bound the updates at the sites with dp-clip-norm instead)"
            )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """Build settings from Flower's ``run_config`` (kebab-case keys), refusing unknown keys."""
        by_key = {f.metadata["key"]: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            if key not in by_key:
                raise ConfigError(
                    f"run config key {key!r} is not a fedmed setting: "
                    f"use one of {', '.join(sorted(by_key))}"
                )
            f = by_key[key]
            values[f.name] = _coerce(f, value)
        return cls(**values)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """The settings as kebab-case ``run_config`` (``from_run_config`` round-trips it)."""
        return {f.metadata["key"]: getattr(self, f.name) for f in dataclasses.fields(self)}

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
        patch and the model (its options are added by :func:`fedmed.task.model_options`
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

    def identity_hash(self) -> str:
        """sha256 of the settings that shape the trained weights (not timeouts or round count).

        A run may be resumed only with the same identity hash (``num-rounds`` counts under a
        learning-rate schedule, which it stretches). ``sites-per-round`` counts
        only when sampling is on and the ``secagg-*`` keys only with secure aggregation, so
        runs without them keep the hash they had before the keys existed (and stay
        resumable).
        """
        ident = {
            f.metadata["key"]: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in _RESUMABLE_KEYS
        }
        if not self.sites_per_round:
            del ident["sites-per-round"]
        if not self.secure_aggregation:  # likewise for runs from before SecAgg+ existed
            for key in ("secure-aggregation", "secagg-clip-range", "secagg-max-weight"):
                del ident[key]
        for key, default in _NEW_TRAINING_KEYS.items():
            if ident[key] == default:
                del ident[key]
        if self.lr_schedule != "constant":  # the schedule spans the run: its length counts
            ident["num-rounds"] = self.num_rounds
        blob = json.dumps(ident, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def _coerce(f: dataclasses.Field[Any], value: Any) -> Any:
    key, kind = f.metadata["key"], f.metadata["kind"]
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str and isinstance(value, str):
        return value
    raise ConfigError(
        f"run config key {key!r} is {value!r} ({type(value).__name__}): "
        f"it must be a TOML {kind.__name__}"
    )


def _check_value(f: dataclasses.Field[Any], value: Any) -> None:
    key = f.metadata["key"]
    limits = (
        ("min", lambda v, b: v >= b, ">="),
        ("max", lambda v, b: v <= b, "<="),
        ("gt", lambda v, b: v > b, ">"),
        ("lt", lambda v, b: v < b, "<"),
    )
    for name, ok, sign in limits:
        if name in f.metadata and not ok(value, f.metadata[name]):
            raise ConfigError(
                f"run config key {key!r} is {value!r}: it must be {sign} {f.metadata[name]}"
            )
    if isinstance(value, float) and value != value:  # NaN passes every comparison above
        raise ConfigError(f"run config key {key!r} is NaN: give a number")


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
