"""Dict transforms in MONAI's key convention; random ones delegate to deterministic twins.

See :mod:`fedmed.transforms.base` for the data-item and metadata convention.
"""

from fedmed.transforms.base import (
    Compose,
    Inverted,
    InvertibleTransform,
    MapTransform,
    RandomTransform,
    is_deterministic,
    undo_last_step,
)
from fedmed.transforms.croppad import CropForegroundd, SpatialCropd, SpatialPadd
from fedmed.transforms.elastic import Elasticd, RandElasticd, elastic_deform
from fedmed.transforms.intensity import (
    GaussianNoised,
    NormalizeIntensityd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityd,
    ScaleIntensityRanged,
    ShiftIntensityd,
)
from fedmed.transforms.invert import (
    invert,
    invert_to_original,
    invert_with_meta,
    save_prediction,
)
from fedmed.transforms.loading import LABEL_DTYPE, LoadImaged
from fedmed.transforms.random_spatial import RandFlipd, RandRotate90d
from fedmed.transforms.sampling import FgBgToIndicesd, RandCropByPosNegLabeld, fg_bg_indices
from fedmed.transforms.spatial import Flipd, Orientationd, Rotate90d, Spacingd

__all__ = [
    "LABEL_DTYPE",
    "Compose",
    "CropForegroundd",
    "Elasticd",
    "FgBgToIndicesd",
    "Flipd",
    "GaussianNoised",
    "Inverted",
    "InvertibleTransform",
    "LoadImaged",
    "MapTransform",
    "NormalizeIntensityd",
    "Orientationd",
    "RandCropByPosNegLabeld",
    "RandElasticd",
    "RandFlipd",
    "RandGaussianNoised",
    "RandRotate90d",
    "RandScaleIntensityd",
    "RandShiftIntensityd",
    "RandomTransform",
    "Rotate90d",
    "ScaleIntensityRanged",
    "ScaleIntensityd",
    "ShiftIntensityd",
    "Spacingd",
    "SpatialCropd",
    "SpatialPadd",
    "elastic_deform",
    "fg_bg_indices",
    "invert",
    "invert_to_original",
    "invert_with_meta",
    "is_deterministic",
    "save_prediction",
    "undo_last_step",
]
