"""Dict transforms in MONAI's key convention; random ones delegate to deterministic twins."""

from fedmed.transforms.base import (
    Compose,
    InvertibleTransform,
    MapTransform,
    RandomTransform,
    is_deterministic,
)

__all__ = ["Compose", "InvertibleTransform", "MapTransform", "RandomTransform", "is_deterministic"]
