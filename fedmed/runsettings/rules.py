"""Which run settings are valid: each key's bounds and vocabulary, and the rules between keys.

:class:`~fedmed.runsettings.settings.RunSettings` calls :func:`check_settings` at construction, so
a run with an unknown strategy, a patch the model cannot take, SecAgg+ with too few sites or
DP-SGD on batch norm never starts; each ConfigError names the key, the bad value and the fix.
Legal but unusual combinations are logged.

Example:
    >>> RunSettings(strategy="fedsgd")
    Traceback (most recent call last):
    fedmed.errors.ConfigError: run config key 'strategy' is 'fedsgd': use one of fedavg, ...
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from fedmed.errors import ConfigError
from fedmed.losses import LOSSES, NR_DENOMINATORS
from fedmed.roundconfig import AGGREGATION_WEIGHTS, LAMP_SKIPS
from fedmed.security.guard import dp_params

if TYPE_CHECKING:
    from .settings import RunSettings

__all__ = [
    "FEDPROX_DEFAULT_MU",
    "LR_SCHEDULES",
    "MODELS",
    "MODEL_NORMS",
    "SECAGG_MIN_SITES",
    "SECAGG_STRATEGIES",
    "STRATEGIES",
    "check_settings",
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
MODELS = ("coplenet", "unet3d", "lamp_unet")
# Strategies that need only the weighted mean of the updates: the one thing SecAgg+ reveals.
SECAGG_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
SECAGG_MIN_SITES = 3
MODEL_NORMS = ("batch", "group")
FEDPROX_DEFAULT_MU = 0.01
LR_SCHEDULES = ("constant", "cosine")


def check_settings(settings: RunSettings) -> None:
    """Raise ConfigError for the first invalid key or combination of keys in ``settings``
    (bounds, vocabularies, then the rules between keys); log the legal but unusual ones."""
    for f in dataclasses.fields(settings):
        _check_value(f, getattr(settings, f.name))
    _check_choices(settings)
    if -1.0 < settings.max_update_norm < 0.0:
        raise ConfigError(
            f"run config key 'max-update-norm' is {settings.max_update_norm}: give -1 (the "
            "default rule), 0 (no bound) or a positive L2 norm"
        )
    _ = settings.reference_model_paths  # parse now so errors surface at construction
    if settings.strategy == "scaffold" and settings.dp_clip_norm > 0:
        raise ConfigError(
            "run config key 'strategy' is 'scaffold' but DP is on (dp-clip-norm > 0): the "
            "sites' control variates would leave them without noise; use fedavg or fedprox "
            "with DP"
        )
    if 0 < settings.sites_per_round < settings.min_sites:
        raise ConfigError(
            f"run config key 'sites-per-round' is {settings.sites_per_round} but min-sites is "
            f"{settings.min_sites}: a round needs min-sites replies, so sample at least that "
            "many (raise sites-per-round, lower min-sites, or 0 = all sites)"
        )
    if settings.secure_aggregation:
        _check_secure_aggregation(settings)
    _ = settings.features, settings.patch_shape  # parse now so errors surface at construction
    _check_training_recipe(settings)
    dp = dp_params(settings)  # DP keys checked together (noise needs a clip norm)
    if dp.mode == "record" and settings.self_ensembling:
        raise ConfigError(
            "run config key 'self-ensembling' is true but dp-mode is 'record': DP-SGD "
            "trains on clipped per-patient gradients of the loss alone, without the EMA "
            "teacher; set self-ensembling = false, or use dp-mode 'site'"
        )
    if dp.mode == "record" and settings.model == "coplenet" and settings.model_norm == "batch":
        raise ConfigError(
            "run config key 'dp-mode' is 'record' but COPLE-Net uses batch norm, whose "
            "statistics mix the patients of a batch (DP-SGD needs per-patient gradients): "
            "set model-norm = 'group'"
        )
    if settings.strategy != "fedprox" and settings.proximal_mu > 0.0:
        logger.info(
            "proximal-mu %s with strategy %r: the sites add the proximal term",
            settings.proximal_mu,
            settings.strategy,
        )


def _check_choices(settings: RunSettings) -> None:
    """Every key with a fixed vocabulary holds one of its words."""
    choices = (
        ("strategy", settings.strategy, STRATEGIES),
        ("model", settings.model, MODELS),
        ("aggregation-weight", settings.aggregation_weight, AGGREGATION_WEIGHTS),
        ("model-norm", settings.model_norm, MODEL_NORMS),
        ("lr-schedule", settings.lr_schedule, LR_SCHEDULES),
        ("loss", settings.loss, ("auto", *LOSSES)),
        ("nr-denominator", settings.nr_denominator, NR_DENOMINATORS),
        ("lamp-skips", settings.lamp_skips, LAMP_SKIPS),
    )
    for key, value, known in choices:
        if value not in known:
            raise ConfigError(f"run config key {key!r} is {value!r}: use one of {', '.join(known)}")


def _check_training_recipe(settings: RunSettings) -> None:
    """The loss, LAMP and preprocessing keys (each error names its key)."""
    if settings.self_ensembling and settings.loss_name != "nr-dice":
        raise ConfigError(
            f"run config key 'self-ensembling' is true but the loss is {settings.loss_name!r}: "
            "COPLE-Net's self-ensembling builds on the noise-robust Dice; set loss = "
            "'nr-dice' (or self-ensembling = false)"
        )
    if settings.lamp_skips != "carried" and settings.model != "lamp_unet":
        raise ConfigError(
            f"run config key 'lamp-skips' is {settings.lamp_skips!r} but model is "
            f"{settings.model!r}: the skip-free variant is LAMP's; use model = 'lamp_unet' or "
            "lamp-skips = 'carried'"
        )
    _ = settings.plan  # target-spacing, intensity and hu-window: errors name the key


def _check_secure_aggregation(settings: RunSettings) -> None:
    if settings.min_sites < SECAGG_MIN_SITES:
        raise ConfigError(
            f"run config key 'secure-aggregation' is true but min-sites is {settings.min_sites}: "
            f"SecAgg+ needs at least {SECAGG_MIN_SITES} sites in every round (with 2, each "
            "site could subtract its own update from the sum and learn the other's); set "
            f"min-sites >= {SECAGG_MIN_SITES} with that many sites, or secure-aggregation = "
            "false"
        )
    if settings.strategy not in SECAGG_STRATEGIES:
        raise ConfigError(
            f"run config key 'strategy' is {settings.strategy!r}, which needs each site's "
            "update, but secure-aggregation shows the server only their sum: use one of "
            f"{', '.join(SECAGG_STRATEGIES)}, or secure-aggregation = false"
        )
    if settings.strategy == "scaffold":
        raise ConfigError(
            "run config key 'strategy' is 'scaffold', whose control variates the server "
            "must see per site, but secure-aggregation shows only sums: use fedavg or "
            "fedprox, or secure-aggregation = false"
        )
    if settings.max_update_norm > 0:
        raise ConfigError(
            "run config key 'max-update-norm' needs each site's update, but "
            "secure-aggregation shows the server only their sum: set max-update-norm = 0 "
            "(bound the updates at the sites with dp-clip-norm instead)"
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
