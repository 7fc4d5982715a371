"""Segmentation networks: COPLE-Net (2D), a 3D U-Net, and the LAMP pipeline-parallel U-Net."""
