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
                                                  connected (nodes unnamed then are asked
                                                  once more) before a FederationError
``round-timeout``           float    600          seconds a round waits for replies
``retry-failed-rounds``     int      2            retries of a round with too few valid replies
``strategy``                str      "fedavg"     fedavg, fedprox, fedadam, fedyogi, fedmedian,
                                                  trimmed-mean, scaffold (control variates at
                                                  the server and each site, Karimireddy 2020)
``fedbn``                   bool     false        keep the normalization *statistics* at each
                                                  site (SiloBN: affine weights are shared, so
                                                  the global model exists; see fedmed.globalmodel)
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

Which values and combinations are valid is :mod:`.settings_rules` (checked at construction);
what follows from the keys (patch shape, loss, plan, per-round learning rate, deadlines) is
:mod:`.settings_derived`, the base class of :class:`RunSettings`.

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedmed.errors import ConfigError

from .derived import DerivedSettings
from .rules import check_settings

__all__ = ["RunSettings"]


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


def _meta(key: str, kind: type, **limits: float) -> dict[str, Any]:
    return {"key": key, "kind": kind, **limits}


@dataclass(frozen=True)
class RunSettings(DerivedSettings):
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
        if self.target_spacing.strip().lower() in ("", "native"):  # one spelling, one hash
            object.__setattr__(self, "target_spacing", "native")
        check_settings(self)

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
