"""Random training patches over a site's cached volumes: the augmentation, an epoch of
patches, and the batches that feed the local trainer.

- :func:`augmentation` is the random part of the pipeline, run on every access: a patch
  sampled by label (:class:`~fedmed.transforms.RandCropByPosNegLabeld`; one axial slice
  squeezed to 2D for COPLE-Net, a 3D patch for the U-Nets), flips, quarter turns and intensity
  jitter.
- :class:`PatchSamples` is an epoch of patches over the cached volumes (2D: as many slices as
  the volumes have; 3D: :data:`PATCHES_PER_CASE_3D` per case) and :func:`patch_loader` batches
  it with a :class:`~fedmed.data.ThreadDataLoader`.

The volumes come from :func:`fedmed.pipeline.cached_volumes` (the deterministic, cached part).

Example:
    >>> volumes = cached_volumes(load_cases(["demo/data/site-A"]), PipelineSettings())
    >>> loader = patch_loader(volumes, patch_size=(96, 96), batch_size=4, seed=0)
    >>> next(iter(loader))["image"].shape
    torch.Size([4, 1, 96, 96])
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from fedmed.data import ThreadDataLoader
from fedmed.errors import ConfigError, DataError
from fedmed.pipeline import Volumes
from fedmed.transforms import (
    Compose,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

__all__ = ["PATCHES_PER_CASE_3D", "PatchSamples", "augmentation", "patch_loader"]

PATCHES_PER_CASE_3D = 4
_KEYS = ("image", "label")
# The label's voxel indices cached by the preprocessing; a padded volume no longer fits them.
_INDEX_KEYS = ("label_fg_indices", "label_bg_indices")


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
