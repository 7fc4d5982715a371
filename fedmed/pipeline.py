"""A site's data pipeline: cached preprocessing of its volumes, random patches in batches.

The same code feeds a federated site (:class:`~fedmed.task.SiteTask`), centralized training
(``fedmed train``), evaluation and inference:

- :func:`preprocessing` is the deterministic prefix, run once per case and cached
  (:func:`cached_volumes`: in RAM, on disk, or on disk sealed with AES-256-GCM):
  ``LoadImaged -> Orientationd(RAS) -> [Spacingd] -> ScaleIntensityRanged (CT window) or
  NormalizeIntensityd (MR z-score) -> FgBgToIndicesd``.
- :func:`augmentation` is the random part, run on every access: a patch sampled by label
  (:class:`~fedmed.transforms.RandCropByPosNegLabeld`; one axial slice squeezed to 2D for
  COPLE-Net, a 3D patch for the U-Nets), flips, quarter turns and intensity jitter.
- :class:`PatchSamples` is an epoch of patches over the cached volumes (2D: as many slices as
  the volumes have; 3D: :data:`PATCHES_PER_CASE_3D` per case) and :func:`patch_loader` batches
  it with a :class:`~fedmed.data.ThreadDataLoader`.

Example:
    >>> settings = PipelineSettings(cache_mode="memory")
    >>> volumes = cached_volumes(load_cases(["demo/data/site-A"]), settings)
    >>> loader = patch_loader(volumes, patch_size=(96, 96), batch_size=4, seed=0)
    >>> next(iter(loader))["image"].shape
    torch.Size([4, 1, 96, 96])
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fedmed.data import CacheDataset, PersistentDataset, ThreadDataLoader
from fedmed.errors import ConfigError, DataError
from fedmed.io.msd import load_site_dataset
from fedmed.security.encryption import load_key
from fedmed.transforms import (
    Compose,
    FgBgToIndicesd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

__all__ = [
    "CACHE_MODES",
    "HU_WINDOW",
    "INTENSITIES",
    "PATCHES_PER_CASE_3D",
    "PatchSamples",
    "PipelineSettings",
    "Volumes",
    "augmentation",
    "cached_volumes",
    "load_cases",
    "patch_loader",
    "preprocessing",
]

logger = logging.getLogger(__name__)

CACHE_MODES = ("memory", "disk", "disk-encrypted", "none")
HU_WINDOW = (-1000.0, 400.0)
INTENSITIES = ("ct-window", "zscore", "zscore-nonzero")
PATCHES_PER_CASE_3D = 4
_KEYS = ("image", "label")
_INDEX_KEYS = ("label_fg_indices", "label_bg_indices")


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

    Example:
        >>> PipelineSettings(cache_mode="disk", cache_dir=Path("runs/site-A/cache"))
    """

    hu_window: tuple[float, float] = HU_WINDOW
    pixdim: tuple[float, float, float] | None = None
    intensity: str = "ct-window"
    cache_mode: str = "memory"
    cache_dir: Path | None = None
    cache_key: str | None = None
    num_workers: int = 1

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


def load_cases(folders: Sequence[str | Path]) -> list[dict[str, str]]:
    """Every labelled case of the site folders, pooled; case ids made unique per folder."""
    if not folders:
        raise ConfigError("no data folder given: pass at least one --data DIR")
    cases: list[dict[str, str]] = []
    seen: set[str] = set()
    for folder in folders:
        for case in load_site_dataset(folder).cases:
            item = dict(case)
            if item["case_id"] in seen:  # pooled sites may reuse ids
                item["case_id"] = f"{Path(folder).name}/{item['case_id']}"
            seen.add(item["case_id"])
            cases.append(item)
    return cases


def preprocessing(settings: PipelineSettings, *, keys: Sequence[str] = _KEYS) -> Compose:
    """The deterministic, cacheable prefix for ``keys`` (``("image",)`` for unlabelled data)."""
    keys = tuple(keys)
    steps: list[Callable[[Any], Any]] = [LoadImaged(keys), Orientationd(keys, "RAS")]
    if settings.pixdim is not None:
        steps.append(Spacingd(keys, settings.pixdim))
    if settings.intensity == "ct-window":
        steps.append(ScaleIntensityRanged("image", *settings.hu_window))
    else:
        steps.append(NormalizeIntensityd("image", nonzero=settings.intensity == "zscore-nonzero"))
    if "label" in keys:
        steps.append(FgBgToIndicesd("label"))
    return Compose(steps)


def cached_volumes(
    cases: Sequence[dict[str, str]], settings: PipelineSettings, *, progress: bool = False
) -> Volumes:
    """The preprocessed ``cases``, cached as ``settings.cache_mode`` says."""
    prefix = preprocessing(settings)
    if settings.cache_mode.startswith("disk"):
        assert settings.cache_dir is not None  # checked by PipelineSettings
        key = load_key(settings.cache_key)
        if settings.cache_mode == "disk-encrypted" and key is None:
            raise ConfigError(
                "cache-mode 'disk-encrypted' needs a key: set FEDMED_CACHE_KEY (hex or base64 "
                "of 32 bytes) or cache-key in the config"
            )
        dataset = PersistentDataset(
            list(cases), prefix, Path(settings.cache_dir) / "volumes", encryption_key=key
        )
        dataset.prepare(num_workers=settings.num_workers, progress=progress)
        return dataset
    rate = 0.0 if settings.cache_mode == "none" else 1.0
    return CacheDataset(
        list(cases), prefix, cache_rate=rate, num_workers=settings.num_workers, progress=progress
    )


def augmentation(patch_size: Sequence[int], *, seed: int) -> Compose:
    """The random part: a patch by label (pos:neg 1:1), then flips, rot90 and intensity jitter.

    A 2-entry ``patch_size`` samples one axial slice ``(C, H, W)``; 3 entries a 3D patch.
    Seeded, so the same ``seed`` gives the same patches in the same order.
    """
    patch = tuple(int(s) for s in patch_size)
    if len(patch) not in (2, 3) or min(patch) < 1:
        raise ConfigError(f"patch-size {patch} must be 2 (COPLE-Net) or 3 (U-Nets) sizes >= 1")
    two_d = len(patch) == 2
    size = (*patch, 1) if two_d else patch
    steps: list[Callable[[Any], Any]] = [
        RandCropByPosNegLabeld(_KEYS, "label", size, pos=1.0, neg=1.0, squeeze_depth=two_d)
    ]
    steps += [RandFlipd(_KEYS, prob=0.2, spatial_axis=axis) for axis in range(len(patch))]
    if patch[0] == patch[1]:  # a quarter turn in the axial plane keeps the patch shape
        steps.append(RandRotate90d(_KEYS, prob=0.2, spatial_axes=(0, 1)))
    steps += [
        RandScaleIntensityd("image", factors=0.1, prob=0.15),
        RandShiftIntensityd("image", offsets=0.1, prob=0.15),
        RandGaussianNoised("image", std=0.02, prob=0.15),
    ]
    return Compose(steps).set_random_state(seed)


class PatchSamples:
    """An epoch of random patches over cached ``volumes``: item ``j`` is one patch of case
    ``case_of(j)``, so ``len()`` counts samples (FedAvg's weight) and shuffling mixes cases.

    2D patches: each case appears once per axial slice; 3D: ``PATCHES_PER_CASE_3D`` times.
    Volumes smaller than the patch are zero-padded first (their stored label indices then no
    longer fit and are recomputed).

    Example:
        >>> samples = PatchSamples(volumes, (96, 96), seed=0)
        >>> samples[0]["image"].shape
        torch.Size([1, 96, 96])
    """

    def __init__(self, volumes: Volumes, patch_size: Sequence[int], *, seed: int) -> None:
        if len(volumes) == 0:
            raise DataError("no training cases: the site has nothing to train on")
        self.volumes = volumes
        self.patch_size = tuple(int(s) for s in patch_size)
        self.transform = augmentation(self.patch_size, seed=seed)
        if len(self.patch_size) == 2:
            counts = [int(volumes[i]["image"].shape[-1]) for i in range(len(volumes))]
        else:
            counts = [PATCHES_PER_CASE_3D] * len(volumes)
        self._case_of = [case for case, n in enumerate(counts) for _ in range(n)]
        self._pad = SpatialPadd(_KEYS, (*self.patch_size, -1)[:3])

    def __len__(self) -> int:
        return len(self._case_of)

    def case_of(self, index: int) -> int:
        """The case sample ``index`` is drawn from."""
        return self._case_of[index]

    def __getitem__(self, index: int) -> dict[Hashable, Any]:
        item: Mapping[Hashable, Any] = self.volumes[self._case_of[index]]
        shape = item["label"].shape[1:]
        if any(s < p for s, p in zip(shape, self.patch_size, strict=False)):
            item = {k: v for k, v in self._pad(item).items() if k not in _INDEX_KEYS}
        (sample,) = self.transform(item)
        return sample


def patch_loader(
    volumes: Volumes,
    *,
    patch_size: Sequence[int],
    batch_size: int,
    seed: int,
    num_threads: int = 1,
) -> ThreadDataLoader:
    """Shuffled batches of :class:`PatchSamples`; ``loader.dataset`` is the samples.

    One thread (the default) keeps the patches reproducible for a given ``seed``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch-size {batch_size} must be >= 1")
    samples = PatchSamples(volumes, patch_size, seed=seed)
    return ThreadDataLoader(
        samples, batch_size=batch_size, shuffle=True, seed=seed, num_threads=num_threads
    )
