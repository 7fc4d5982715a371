"""Segmentation networks: COPLE-Net (2D), a 3D U-Net, and the LAMP pipeline-parallel U-Net."""

from fedmed.nets.build import MODELS, build_model
from fedmed.nets.coplenet import COPLENet
from fedmed.nets.lamp import LAMPUNet
from fedmed.nets.partition import (
    CellProfile,
    Partition,
    balance_costs,
    partition_cells,
    profile_cells,
)
from fedmed.nets.pipeline import run_pipeline
from fedmed.nets.unet3d import UNet3D, build_unet_cells

__all__ = [
    "MODELS",
    "COPLENet",
    "CellProfile",
    "LAMPUNet",
    "Partition",
    "UNet3D",
    "balance_costs",
    "build_model",
    "build_unet_cells",
    "partition_cells",
    "profile_cells",
    "run_pipeline",
]
