"""A site's data pipeline: its cases listed, checked, preprocessed and cached as volumes.

The same code feeds a federated site (:class:`~fedmed.task.SiteTask`), centralized training
(``fedmed train``), evaluation and inference:

- :func:`load_cases` lists a site's cases and runs the case guard's header checks
  (:mod:`fedmed.io.guard`); :func:`site_volumes` is the whole site: load, split, cache.
- :func:`preprocessing` is the deterministic prefix, run once per case and cached
  (:func:`cached_volumes`: in RAM, on disk, or on disk sealed with AES-256-GCM):
  ``LoadImaged -> Orientationd(RAS) -> [Spacingd] -> ScaleIntensityRanged (CT window) or
  NormalizeIntensityd (MR z-score) -> FgBgToIndicesd``, wrapped in :class:`CaseGuard`, which
  checks the voxels just loaded (NaN/inf, undeclared label values), so the guard costs no
  extra read and its verdict is cached with the case.
- the random part, run on every access (patches by label, flips, intensity jitter, batches),
  is :mod:`fedmed.patches`.

Example:
    >>> settings = PipelineSettings(cache_mode="memory")
    >>> volumes = cached_volumes(load_cases(["demo/data/site-A"]), settings)
    >>> volumes[0]["image"].shape[0]  # channel-first, preprocessed
    1
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from fedmed.data import CacheDataset, PersistentDataset
from fedmed.errors import ConfigError, DataError
from fedmed.io.check import value_problems
from fedmed.io.guard import (
    CLASSES_KEY,
    BadCase,
    GuardSettings,
    report_bad_cases,
    require_cases,
    screen_cases,
)
from fedmed.io.msd import DEFAULT_LABEL_NAMES, load_site_dataset, split_cases
from fedmed.security.encryption import load_key
from fedmed.text import printable
from fedmed.transforms import (
    Compose,
    FgBgToIndicesd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

__all__ = [
    "CACHE_MODES",
    "HU_WINDOW",
    "INTENSITIES",
    "CaseGuard",
    "PipelineSettings",
    "Volumes",
    "cached_volumes",
    "load_cases",
    "preprocessing",
    "site_volumes",
    "usable_cases",
]

logger = logging.getLogger(__name__)

CACHE_MODES = ("memory", "disk", "disk-encrypted", "none")
HU_WINDOW = (-1000.0, 400.0)
INTENSITIES = ("ct-window", "zscore", "zscore-nonzero")
_KEYS = ("image", "label")
_FAILED = "guard_failure"  # key of a case CaseGuard refused; its value says why


class Volumes(Protocol):
    """The preprocessed cases: ``len()`` and ``[i]`` -> a dict with ``image``, ``label``, meta."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Any: ...


@dataclass(frozen=True)
class PipelineSettings:
    """How a site preprocesses and caches its volumes; invalid values raise ConfigError.

    ``cache_mode``: ``memory`` (RAM), ``disk`` (safetensors files in ``cache_dir``, sealed
    when a key is set), ``disk-encrypted`` (the same, but a key is required), ``none``.
    ``cache_key``: the AES-256 key as hex/base64 text; ``None`` reads ``FEDMED_CACHE_KEY``.
    ``pixdim``: resample to this voxel size in mm (``None`` keeps the native spacing).
    ``intensity``: ``ct-window`` (``hu_window`` mapped to [0, 1]), ``zscore`` (MR: per volume)
    or ``zscore-nonzero`` (statistics over the non-zero voxels, for skull-stripped scans).

    ``guard``: the case guard's rules (:class:`~fedmed.io.guard.GuardSettings`: memory limit,
    label affine tolerance, skip or stop on a bad case, links out of the folder).

    Example:
        >>> PipelineSettings(cache_mode="disk", cache_dir=Path("runs/site-A/cache"),
        ...                  guard=GuardSettings(on_bad_case="stop"))
    """

    hu_window: tuple[float, float] = HU_WINDOW
    pixdim: tuple[float, float, float] | None = None
    intensity: str = "ct-window"
    cache_mode: str = "memory"
    cache_dir: Path | None = None
    cache_key: str | None = None
    num_workers: int = 1
    guard: GuardSettings = field(default_factory=GuardSettings)

    def __post_init__(self) -> None:
        if self.cache_mode not in CACHE_MODES:
            raise ConfigError(
                f"cache-mode {self.cache_mode!r} is unknown: use one of {', '.join(CACHE_MODES)}"
            )
        if self.cache_mode.startswith("disk") and not self.cache_dir:
            raise ConfigError(f"cache-mode {self.cache_mode!r} needs a cache-dir: set one")
        low, high = (*self.hu_window, math.nan, math.nan)[:2]
        if len(self.hu_window) != 2 or not (
            math.isfinite(low) and math.isfinite(high) and high > low
        ):
            raise ConfigError(f"hu-window {self.hu_window} must be (low, high) HU with high > low")
        if self.pixdim is not None and (
            len(self.pixdim) != 3 or not all(math.isfinite(p) and p > 0 for p in self.pixdim)
        ):
            raise ConfigError(f"pixdim {self.pixdim} must be three positive voxel sizes in mm")
        if self.intensity not in INTENSITIES:
            raise ConfigError(
                f"intensity {self.intensity!r} is unknown: use {', '.join(INTENSITIES)}"
            )
        if self.num_workers < 1:
            raise ConfigError(f"num-workers {self.num_workers} must be >= 1")

    def to_json(self) -> dict[str, Any]:
        """What changes the model's input (for checkpoint metadata); no paths, no key."""
        return {
            "hu_window": list(self.hu_window),
            "pixdim": self.pixdim and list(self.pixdim),
            "intensity": self.intensity,
        }


def load_cases(
    folders: Sequence[str | Path], settings: PipelineSettings | None = None
) -> list[dict[str, Any]]:
    """Every labelled case of the site folders that passes the guard's header checks, pooled;
    case ids made unique per folder.

    Each case carries its allowed label values (:data:`~fedmed.io.guard.CLASSES_KEY`) for
    :func:`cached_volumes`. Bad cases are skipped with a warning or raise, as
    ``settings.guard.on_bad_case`` says; DataError when no case remains.
    """
    if not folders:
        raise ConfigError("no data folder given: pass at least one --data DIR")
    settings = settings or PipelineSettings()
    cases: list[dict[str, Any]] = []
    seen: set[str] = set()
    for folder in folders:
        site = load_site_dataset(
            folder, require_files=False, allow_external_links=settings.guard.allow_external_links
        )
        good, bad = screen_cases(site, settings.guard, workers=settings.num_workers)
        where = printable(site.root)
        report_bad_cases(bad, total=len(site.cases), policy=settings.guard.on_bad_case, where=where)
        if not good:
            raise DataError(
                f"{where}: none of its {len(site.cases)} cases passed the data check; fix the "
                "files named in the warnings above (`fedmed data check` lists them)"
            )
        for item in good:
            if item["case_id"] in seen:  # pooled sites may reuse ids
                item["case_id"] = f"{Path(folder).name}/{item['case_id']}"
            seen.add(item["case_id"])
            cases.append(item)
    return cases


def site_volumes(
    folders: Sequence[str | Path],
    settings: PipelineSettings,
    *,
    val_fraction: float,
    seed: int,
    progress: bool = False,
) -> tuple[Volumes, Volumes]:
    """A site's ``(train, val)`` volumes: :func:`load_cases`, the by-patient
    :func:`~fedmed.io.msd.split_cases`, :func:`cached_volumes` for each side.

    Raises DataError when fewer than :data:`~fedmed.io.guard.MIN_SITE_CASES` (2) usable cases
    remain in all, or none for training.

    Example:
        >>> train, val = site_volumes(["demo/data/site-A"], PipelineSettings(), val_fraction=0.2,
        ...                           seed=0)
    """
    cases = load_cases(folders, settings)
    where = ", ".join(printable(Path(f).absolute()) for f in folders)
    train_cases, val_cases = split_cases(cases, val_fraction=val_fraction, seed=seed)
    require_cases(len(train_cases), len(val_cases), where=where)
    train = cached_volumes(train_cases, settings, progress=progress)
    val = cached_volumes(val_cases, settings, progress=progress)
    require_cases(len(train), len(val), where=where)
    return train, val


def preprocessing(settings: PipelineSettings, *, keys: Sequence[str] = _KEYS) -> Compose:
    """The deterministic, cacheable prefix for ``keys`` (``("image",)`` for unlabelled data)."""
    keys = tuple(keys)
    steps: list[Callable[[Any], Any]] = [
        LoadImaged(keys, max_bytes=settings.guard.max_image_bytes),
        Orientationd(keys, "RAS"),
    ]
    if settings.pixdim is not None:
        steps.append(Spacingd(keys, settings.pixdim))
    if settings.intensity == "ct-window":
        steps.append(ScaleIntensityRanged("image", *settings.hu_window))
    else:
        steps.append(NormalizeIntensityd("image", nonzero=settings.intensity == "zscore-nonzero"))
    if "label" in keys:
        steps.append(FgBgToIndicesd("label"))
    return Compose(steps)


class CaseGuard(MapTransform):
    """The preprocessing of one labelled case with the guard's value checks after loading.

    A case whose files fail to load or whose voxels fail
    :func:`~fedmed.io.check.value_problems` (NaN/inf in the image, label values outside the
    case's :data:`~fedmed.io.guard.CLASSES_KEY`, default ``{0, 1}``) comes out as a small
    marker holding the reason instead of tensors; :func:`cached_volumes` leaves those out.
    Deterministic, so the caching datasets cache its output: the verdict is computed once per
    case (and kept on disk with the ``disk`` cache modes, keyed on the files' content).

    Example:
        >>> guard = CaseGuard(preprocessing(PipelineSettings()))
        >>> sorted(guard({"image": "img.nii.gz", "label": "seg.nii.gz", "case_id": "p01"}))
        ['case_id', 'image', 'image_meta', 'label', 'label_bg_indices', ...]
    """

    def __init__(self, steps: Compose) -> None:
        super().__init__(_KEYS)
        if not steps.transforms or not isinstance(steps.transforms[0], LoadImaged):
            raise ValueError("CaseGuard needs a preprocessing that starts with LoadImaged")
        self.load = steps.transforms[0]
        self.rest = Compose(steps.transforms[1:])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        classes = d.pop(CLASSES_KEY, sorted(DEFAULT_LABEL_NAMES))
        try:
            loaded = self.load(d)
            problems = value_problems(
                d["image"], loaded["image"].numpy(), d["label"], loaded["label"].numpy(), classes
            )
            if not problems:
                return self.rest(loaded)
            reason = "; ".join(str(p) for p in problems)
        except DataError as err:
            reason = str(err)
        return {**{k: v for k, v in d.items() if isinstance(v, (str, Path))}, _FAILED: reason}

    def params(self) -> dict[str, Any]:
        # the memory limit decides which cases load, so it belongs in the cache key
        return {
            "steps": [self.load.config(), *self.rest.config()],
            "max_bytes": self.load.max_bytes,
        }


class _Usable:
    """The cases of ``volumes`` at ``indices`` (those the guard passed), as Volumes."""

    def __init__(self, volumes: Volumes, indices: Sequence[int]) -> None:
        self.volumes, self.indices = volumes, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.volumes[self.indices[index]]


def usable_cases(cases: Sequence[Mapping[str, Any]], volumes: Volumes) -> list[Mapping[str, Any]]:
    """The entries of ``cases`` that :func:`cached_volumes` kept, in the volumes' order."""
    if isinstance(volumes, _Usable):
        return [cases[i] for i in volumes.indices]
    return list(cases)


def cached_volumes(
    cases: Sequence[Mapping[str, Any]], settings: PipelineSettings, *, progress: bool = False
) -> Volumes:
    """The preprocessed ``cases`` that pass the guard's value checks, cached as
    ``settings.cache_mode`` says; bad cases are skipped with a warning or raise
    (``settings.guard.on_bad_case``). ``cache_mode="none"`` runs the preprocessing once more per
    case up front, to find the bad ones."""
    prefix = Compose([CaseGuard(preprocessing(settings))])
    if settings.cache_mode.startswith("disk"):
        assert settings.cache_dir is not None  # checked by PipelineSettings
        key = load_key(settings.cache_key)
        if settings.cache_mode == "disk-encrypted" and key is None:
            raise ConfigError(
                "cache-mode 'disk-encrypted' needs a key: set FEDMED_CACHE_KEY (hex or base64 "
                "of 32 bytes) or cache-key in the config"
            )
        dataset: CacheDataset | PersistentDataset = PersistentDataset(
            list(cases), prefix, Path(settings.cache_dir) / "volumes", encryption_key=key
        )
        items = _build(dataset, settings.num_workers, progress)
    else:
        rate = 0.0 if settings.cache_mode == "none" else 1.0
        dataset = CacheDataset(
            list(cases), prefix, cache_rate=rate, num_workers=settings.num_workers,
            progress=progress,
        )  # fmt: skip
        items = (dataset[i] for i in range(len(dataset)))
    bad: list[BadCase] = []
    usable: list[int] = []
    for index, item in enumerate(items):
        if _FAILED in item:
            bad.append((str(item.get("case_id", index)), item[_FAILED]))
        else:
            usable.append(index)
    report_bad_cases(bad, total=len(cases), policy=settings.guard.on_bad_case, where="site data")
    return dataset if not bad else _Usable(dataset, usable)


def _build(dataset: PersistentDataset, workers: int, progress: bool) -> list[dict[str, Any]]:
    """Build or read every entry (what ``prepare`` does), keeping only what the guard needs:
    the marker of a bad case, an empty dict for a good one."""

    def entry(index: int) -> dict[str, Any]:
        item = dataset.cached_item(index)
        return item if _FAILED in item else {}

    bar = tqdm(total=len(dataset), desc="caching", unit="item", disable=not progress, leave=False,
               file=sys.stderr)  # fmt: skip
    with bar, ThreadPoolExecutor(max(1, workers), thread_name_prefix="fedmed-guard") as pool:
        found = []
        for item in pool.map(entry, range(len(dataset))):
            found.append(item)
            bar.update()
    return found
