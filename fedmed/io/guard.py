"""The case guard: which cases of a site may be trained or evaluated on, and what happens to
the others.

The training and evaluation pipelines (:mod:`fedmed.pipeline`) run the data check's two
halves where they cost least: :func:`screen_cases` checks every case's headers when the cases
are listed (missing files, unreadable or oversized files, datatype, channels, affine, the
label on the image grid), and the value half (:func:`~fedmed.io.check.value_problems`: NaN/inf
in the image, label values outside :func:`allowed_classes`) runs on the arrays the pipeline
loads anyway, once per case when it is cached. A case that fails either half is *bad*:

- ``on_bad_case = "skip"`` (the default): it is left out, with a warning naming its files and
  problems; the site refuses to train (:func:`require_cases`) when fewer than
  :data:`MIN_SITE_CASES` cases remain;
- ``on_bad_case = "stop"``: any bad case stops the site with a DataError listing them all.

:class:`GuardSettings` holds the rules, with the site config's keys and defaults.

Example:
    >>> guard = GuardSettings(on_bad_case="stop")
    >>> good, bad = screen_cases(load_site_dataset("demo/data/site-A"), guard)
    >>> report_bad_cases(bad, total=len(good) + len(bad), policy=guard.on_bad_case, where="A")
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmed.errors import ConfigError, DataError
from fedmed.io.check import DEFAULT_AFFINE_ATOL, Problem, header_problems
from fedmed.io.header import DEFAULT_MAX_IMAGE_BYTES
from fedmed.io.msd import DATASET_JSON, DEFAULT_LABEL_NAMES, SiteDataset
from fedmed.text import printable

__all__ = [
    "CLASSES_KEY",
    "MIN_SITE_CASES",
    "ON_BAD_CASE",
    "BadCase",
    "GuardSettings",
    "allowed_classes",
    "report_bad_cases",
    "require_cases",
    "screen_cases",
]

logger = logging.getLogger(__name__)

ON_BAD_CASE = ("skip", "stop")
MIN_SITE_CASES = 2  # one to train on and one to validate on
CLASSES_KEY = "label_classes"  # a case's allowed label values, carried in its data dict
_GIB = 1024**3
_LARGE_TOLERANCE_MM = 1.0
# node config key (SiteConfig.node_config()) -> (GuardSettings field, accepted types)
_NODE_KEYS: dict[str, tuple[str, tuple[type, ...]]] = {
    "max-image-gib": ("max_image_bytes", (int, float)),
    "label-affine-tolerance": ("label_affine_tolerance", (int, float)),
    "on-bad-case": ("on_bad_case", (str,)),
    "allow-external-links": ("allow_external_links", (bool,)),
}

# A case that failed the guard: (case id, its problems as one line).
BadCase = tuple[str, str]


@dataclass(frozen=True)
class GuardSettings:
    """The guard's rules (site config keys, and defaults, in brackets); invalid values raise
    ConfigError.

    ``max_image_bytes`` [``max-image-gib``, 2 GiB]: the memory one image may need once read;
    ``label_affine_tolerance`` [``label-affine-tolerance``, 1e-3 mm]: how far a label's
    affine may differ from its image's, entry by entry; ``on_bad_case`` [``on-bad-case``,
    ``"skip"``]: ``skip`` a bad case or ``stop`` the site; ``allow_external_links``
    [``allow-external-links``, false]: follow symbolic links out of the site folder;
    ``num_classes`` [none]: the model's output classes when known (see
    :func:`allowed_classes`).

    Example:
        >>> GuardSettings.from_node_config({"on-bad-case": "stop", "max-image-gib": 4.0})
        GuardSettings(max_image_bytes=4294967296, ..., on_bad_case='stop', ...)
    """

    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    label_affine_tolerance: float = DEFAULT_AFFINE_ATOL
    on_bad_case: str = "skip"
    allow_external_links: bool = False
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if self.max_image_bytes < 1:
            raise ConfigError(f"max-image-gib {self.max_image_bytes / _GIB:g} must be > 0")
        tolerance = self.label_affine_tolerance
        if not (math.isfinite(tolerance) and tolerance >= 0):
            raise ConfigError(f"label-affine-tolerance {tolerance} must be >= 0 (mm)")
        if tolerance > _LARGE_TOLERANCE_MM:
            logger.warning(
                "label-affine-tolerance %g mm: labels up to %g mm off their image are trained on",
                tolerance,
                tolerance,
            )
        if self.on_bad_case not in ON_BAD_CASE:
            raise ConfigError(
                f"on-bad-case {self.on_bad_case!r} is unknown: use one of {', '.join(ON_BAD_CASE)}"
            )
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"num-classes {self.num_classes} must be >= 2 (background + one)")

    @classmethod
    def from_node_config(cls, node: Mapping[str, Any], **overrides: Any) -> GuardSettings:
        """The rules a SuperNode's node config sets (``max-image-gib``,
        ``label-affine-tolerance``, ``on-bad-case``, ``allow-external-links``); absent keys
        keep their defaults, ``overrides`` (field names) win. ConfigError names a bad key."""
        values: dict[str, Any] = {}
        for key, (name, kinds) in _NODE_KEYS.items():
            if key not in node:
                continue
            value = node[key]
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                wanted = " or ".join(k.__name__ for k in kinds)
                raise ConfigError(
                    f"node config {key} = {value!r} must be {wanted}: fix the site config"
                )
            values[name] = value
        if "max_image_bytes" in values:
            values["max_image_bytes"] = int(values["max_image_bytes"] * _GIB)
        return cls(**{**values, **overrides})


def allowed_classes(site: SiteDataset, num_classes: int | None = None) -> frozenset[int]:
    """The label values a case of ``site`` may hold.

    The classes ``dataset.json`` declares; without a declaration, the model's ``num_classes``
    (``0 .. num_classes - 1``) when known, else ``{0, 1}``. A known ``num_classes`` also drops
    declared classes the model cannot predict.
    """
    if site.labels_declared:
        classes = site.label_classes
    elif num_classes is not None:
        classes = frozenset(range(num_classes))
    else:
        classes = frozenset(DEFAULT_LABEL_NAMES)
    if num_classes is not None:
        classes = frozenset(c for c in classes if c < num_classes)
    return classes


def screen_cases(
    site: SiteDataset, guard: GuardSettings, *, workers: int = 1
) -> tuple[list[dict[str, object]], list[BadCase]]:
    """``(good, bad)``: the site's cases whose headers pass, each with its allowed label
    values under :data:`CLASSES_KEY`, and the others with their problems."""
    classes = sorted(allowed_classes(site, guard.num_classes))

    def screen(case: dict[str, str]) -> list[Problem]:
        image, label = Path(case["image"]), Path(case["label"])
        missing = [
            Problem(path, f"{key} of case {printable(case['case_id'])} not found")
            for key, path in (("image", image), ("label", label))
            if not path.is_file()
        ]
        return missing or header_problems(
            image,
            label,
            affine_atol=guard.label_affine_tolerance,
            max_image_bytes=guard.max_image_bytes,
        )

    good: list[dict[str, object]] = []
    bad: list[BadCase] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for case, problems in zip(site.cases, pool.map(screen, site.cases), strict=True):
            if problems:
                bad.append((case["case_id"], "; ".join(str(p) for p in problems)))
            else:
                good.append({**case, CLASSES_KEY: classes})
    return good, bad


def report_bad_cases(bad: Sequence[BadCase], *, total: int, policy: str, where: str) -> None:
    """Warn about each bad case (``policy="skip"``) or raise one DataError listing them all
    (``"stop"``); ``total`` counts the cases looked at, ``where`` names the site folder(s)."""
    if not bad:
        return
    if policy == "stop":
        listed = "\n  ".join(f"case {printable(case)}: {printable(text)}" for case, text in bad)
        raise DataError(
            f"{where}: {len(bad)} of {total} cases failed the data check and on-bad-case is "
            f'"stop"; fix them, or set on-bad-case = "skip" to leave them out:\n  {listed}'
        )
    for case, text in bad:
        logger.warning(
            "%s: case %s skipped (neither trained nor evaluated on): %s",
            where,
            printable(case),
            printable(text),
        )
    logger.warning(
        "%s: %d of %d cases skipped; run `fedmed data check` on the folder for the full report",
        where,
        len(bad),
        total,
    )


def require_cases(train: int, val: int, *, where: str) -> None:
    """Refuse to train (DataError) with fewer than :data:`MIN_SITE_CASES` usable cases in all,
    or no training case; ``train``/``val`` count the usable cases of each side."""
    if train + val < MIN_SITE_CASES or train < 1:
        raise DataError(
            f"{where}: only {train + val} usable case(s) ({train} for training, {val} for "
            f"validation); a site needs at least {MIN_SITE_CASES} and one to train on: fix "
            f"the files named in the warnings above (`fedmed data check` lists them) or add "
            f"cases to {DATASET_JSON}"
        )
