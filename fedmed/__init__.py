"""fedmed: federated learning for medical image segmentation on Flower.

Sites keep their scans; only model weights and scalar metrics cross the wire.
See README.md for the quick start and ../DESIGN.md for the architecture.
"""

from __future__ import annotations

import os

# Hospitals allow no unexpected egress: Flower's telemetry is off unless the user opts in
# by setting FLWR_TELEMETRY_ENABLED themselves.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from fedmed.errors import (
    ConfigError,
    DataError,
    FederationError,
    FedmedError,
    ModelError,
    SecurityError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "FederationError",
    "FedmedError",
    "ModelError",
    "SecurityError",
    "__version__",
]
