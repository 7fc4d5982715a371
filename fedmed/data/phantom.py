"""Chest-CT-like phantom anatomy in millimetres, sampled on a voxel grid (used by the demo data).

A patient is drawn from a random generator, independent of any scanner: an elliptic body of soft
tissue (~40 HU) with a fat rim (~-100), a vertebra (~400), two lungs (~-850, +40 HU towards the
back) with a heart notch, branching vessel trees (~40) from each hilum, and 1-4 lesions in the
lungs: fuzzy, lobulated ground-glass opacities (-700..-400, vessels stay visible through them)
and consolidations (-100..40). :meth:`ChestPhantom.render` samples it on a :class:`VoxelGrid`,
working only inside each structure's bounding box so that 512x512x100 takes about a second.

Example:
    >>> grid = VoxelGrid((64, 64, 32), (5.9, 5.9, 10.0))
    >>> phantom = ChestPhantom(grid, np.random.default_rng(0))
    >>> image, true_label, site_label = phantom.render(0.0, np.random.default_rng(1))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ChestPhantom", "VoxelGrid"]

_AIR, _FAT, _SOFT, _BONE, _BLOOD = -1000.0, -100.0, 40.0, 400.0, 40.0

# Directions (lateral, anterior, superior) of the vessel trees leaving each hilum.
_VESSEL_ROOTS = (
    (0.2, 0.1, 1.0),
    (0.2, -0.1, -1.0),
    (1.0, 0.4, 0.5),
    (1.0, -0.5, 0.4),
    (1.0, 0.3, -0.5),
    (1.0, -0.4, -0.6),
)


@dataclass(frozen=True)
class _Lesion:
    """A lobulated ellipsoid: ``waves`` (direction, phase, amplitude) modulate its radius;
    ``softness`` is the width of its fuzzy edge in units of the radius."""

    center: np.ndarray
    radii: np.ndarray
    hu: float
    softness: float
    ground_glass: bool
    waves: tuple[tuple[np.ndarray, float, float], ...]


class VoxelGrid:
    """World coordinates (mm, centred on the scanner's isocentre) of a voxel grid; the affine
    is diagonal (RAS, spacing on the diagonal).

    Example:
        >>> VoxelGrid((4, 4, 2), (1.0, 1.0, 3.0)).affine[:3, 3]
        array([-1.5, -1.5, -1.5])
    """

    def __init__(self, shape: tuple[int, int, int], spacing: Sequence[float]) -> None:
        self.shape = shape
        self.spacing = np.asarray(spacing, dtype=np.float64)
        origin = -(np.asarray(shape) - 1) / 2.0 * self.spacing
        self.axes = [
            (origin[d] + np.arange(shape[d]) * self.spacing[d]).astype(np.float32) for d in range(3)
        ]
        self.affine = np.diag([*self.spacing, 1.0])
        self.affine[:3, 3] = origin

    def box(
        self, low: Sequence[float], high: Sequence[float]
    ) -> tuple[tuple[slice, ...], list[np.ndarray]] | None:
        """Index slices of the voxels with centres in [low, high] mm and their broadcastable
        coordinates, or None when the box misses the grid."""
        slices, coords = [], []
        for d, axis in enumerate(self.axes):
            start = int(np.searchsorted(axis, low[d], side="left"))
            stop = int(np.searchsorted(axis, high[d], side="right"))
            if stop <= start:
                return None
            slices.append(slice(start, stop))
            view = [1, 1, 1]
            view[d] = stop - start
            coords.append(axis[start:stop].reshape(view))
        return tuple(slices), coords


class ChestPhantom:
    """One patient's anatomy in mm, drawn from ``rng``; :meth:`render` samples it on ``grid``.

    Example:
        >>> ChestPhantom(grid, np.random.default_rng(0)).render(0.6, np.random.default_rng(1))
    """

    def __init__(self, grid: VoxelGrid, rng: np.random.Generator) -> None:
        self.grid = grid
        self.rng = rng
        u = rng.uniform
        self.body = (u(-8, 8), u(-10, 6), u(140, 172), u(100, 125))  # cx, cy, a, b
        self.fat = u(8, 24)
        self.lung_hu = u(-870, -830)
        self.soft_hu = _SOFT + u(-8, 8)
        cx, cy, a, b = self.body
        cz, half_height = u(-20, 20), u(105, 135)
        self.lungs = [
            (
                np.array([cx + side * 0.47 * a, cy + 0.08 * b, cz]),
                np.array([0.36 * a * u(0.9, 1.05), 0.68 * b * u(0.9, 1.05), half_height]),
            )
            for side in (-1.0, 1.0)
        ]
        self.heart = (
            np.array([cx + 0.18 * a, cy + 0.3 * b, cz - 0.45 * half_height]),
            np.array([0.38 * a, 0.45 * b, 0.5 * half_height]),
        )
        self.vessels = [seg for center, radii in self.lungs for seg in self._tree(center, radii)]
        self.lesions = [self._lesion() for _ in range(int(rng.integers(1, 5)))]

    def _tree(
        self, center: np.ndarray, radii: np.ndarray
    ) -> list[tuple[np.ndarray, np.ndarray, float]]:
        # Roots at the hilum (medial side of the lung), branching outward.
        medial = -np.sign(center[0] - self.body[0])
        hilum = center + np.array([medial * 0.55 * radii[0], 0.0, 0.1 * radii[2]])
        segments = []
        for direction in _VESSEL_ROOTS:
            d = np.asarray(direction, dtype=np.float64) * (-medial, 1, 1)
            d += self.rng.normal(0, 0.15, 3)
            self._branch(hilum, d / np.linalg.norm(d), 0.28 * radii[2], 4.0, 4, segments)
        return segments

    def _branch(
        self,
        start: np.ndarray,
        direction: np.ndarray,
        length: float,
        radius: float,
        depth: int,
        out: list[tuple[np.ndarray, np.ndarray, float]],
    ) -> None:
        end = start + direction * length
        out.append((start, end, radius))
        if depth == 0:
            return
        for _ in range(2):
            turn = self.rng.normal(0, 0.7, 3)
            child = direction + turn - direction * float(turn @ direction)
            child /= np.linalg.norm(child)
            self._branch(end, child, length * 0.8, radius * 0.72, depth - 1, out)

    def _lesion(self) -> _Lesion:
        u = self.rng.uniform
        center, radii = self.lungs[int(self.rng.integers(2))]
        direction = self.rng.normal(size=3)
        direction[1] -= 0.5  # COVID-19 lesions favour the dependent, peripheral lung
        direction /= np.linalg.norm(direction)
        position = center + direction * radii * u(0.35, 0.8)
        ground_glass = bool(u() < 0.65)
        waves = tuple((self.rng.normal(size=3), u(0, 2 * math.pi), u(0.06, 0.14)) for _ in range(2))
        lesion_radii = np.array([u(12, 32), u(12, 32), u(12, 32)])
        return _Lesion(
            center=position,
            radii=lesion_radii,
            hu=u(-700, -400) if ground_glass else u(-100, 40),
            softness=0.12 if ground_glass else 0.05,
            ground_glass=ground_glass,
            waves=waves,
        )

    def render(
        self, label_noise: float, label_rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(image_hu, true_label, site_label)`` on the grid."""
        grid = self.grid
        x, y = grid.axes[0][:, None], grid.axes[1][None, :]
        cx, cy, a, b = self.body
        ring = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2
        inner = ((x - cx) / (a - self.fat)) ** 2 + ((y - cy) / (b - self.fat)) ** 2
        spine = ((x - cx) ** 2 + (y - (cy - b + 32.0)) ** 2) <= 14.0**2
        plane = np.where(ring <= 1.0, np.where(inner <= 1.0, self.soft_hu, _FAT), _AIR)
        plane = np.where(spine, _BONE, plane).astype(np.float32)
        image = np.repeat(plane[:, :, None], grid.shape[2], axis=2)
        lung = np.zeros(grid.shape, dtype=bool)
        for center, radii in self.lungs:
            found = grid.box(center - radii, center + radii)
            if found is not None:
                slices, (lx, ly, lz) = found
                lung[slices] |= _ellipsoid_r2((lx, ly, lz), center, radii) <= 1.0
        found = grid.box(self.heart[0] - self.heart[1], self.heart[0] + self.heart[1])
        if found is not None:
            slices, coords = found
            lung[slices] &= _ellipsoid_r2(coords, *self.heart) > 1.0
        # Dependent (posterior, low y in RAS) lung is denser: +40 HU from front to back.
        front, back = float(y.max()), float(y.min())
        gradient = self.lung_hu + 40.0 * (front - y) / max(front - back, 1.0)
        lung_field = np.broadcast_to(gradient[:, :, None].astype(np.float32), grid.shape)
        np.copyto(image, lung_field, where=lung)
        edge = float(min(grid.spacing))
        for start, end, radius in self.vessels:
            self._draw_vessel(image, lung, start, end, radius, edge)
        true_label = np.zeros(grid.shape, dtype=np.uint8)
        site_label = true_label if label_noise == 0 else np.zeros(grid.shape, dtype=np.uint8)
        for lesion in self.lesions:
            # Draw the label-noise choice for every lesion so the stream does not depend on
            # which lesions fall inside the field of view.
            noisy = label_rng.uniform() < label_noise
            choice = int(label_rng.integers(3))
            cut = (1.3, 0.7, None)[choice] if noisy else 1.0
            self._draw_lesion(image, lung, lesion, true_label, site_label, cut)
        return image, true_label, site_label

    def _draw_vessel(
        self,
        image: np.ndarray,
        lung: np.ndarray,
        start: np.ndarray,
        end: np.ndarray,
        radius: float,
        edge: float,
    ) -> None:
        pad = radius + edge
        found = self.grid.box(np.minimum(start, end) - pad, np.maximum(start, end) + pad)
        if found is None:
            return
        slices, (px, py, pz) = found
        mask = lung[slices]
        if not mask.any():
            return
        d = (end - start).astype(np.float32)
        rx, ry, rz = px - float(start[0]), py - float(start[1]), pz - float(start[2])
        t = np.clip((rx * d[0] + ry * d[1] + rz * d[2]) / float(d @ d), 0.0, 1.0)
        dist = np.sqrt((rx - t * d[0]) ** 2 + (ry - t * d[1]) ** 2 + (rz - t * d[2]) ** 2)
        weight = np.clip((radius - dist) / edge + 0.5, 0.0, 1.0) * mask
        box = image[slices]
        box += weight * (np.float32(_BLOOD) - box)

    def _draw_lesion(
        self,
        image: np.ndarray,
        lung: np.ndarray,
        lesion: _Lesion,
        true_label: np.ndarray,
        site_label: np.ndarray,
        cut: float | None,
    ) -> None:
        center, radii = lesion.center, lesion.radii
        reach = radii * 1.6
        found = self.grid.box(center - reach, center + reach)
        if found is None:
            return
        slices, coords = found
        rho = np.sqrt(_ellipsoid_r2(coords, center, radii))
        for normal, phase, amplitude in lesion.waves:
            k = normal / float(np.mean(radii)) * 2.0
            wave = sum(float(k[d]) * (coords[d] - center[d]) for d in range(3))
            rho = rho * (1.0 + amplitude * np.sin(wave + phase))
        mask = lung[slices]
        softness = lesion.softness
        weight = mask / (1.0 + np.exp(np.clip((rho - 1.0) / softness, -30.0, 30.0)))
        box = image[slices]
        blended = box + weight.astype(np.float32) * (np.float32(lesion.hu) - box)
        if lesion.ground_glass:
            np.maximum(box, blended, out=box)  # vessels stay visible through ground glass
        else:
            box[...] = blended
        inside = mask & (rho < 1.0)
        true_label[slices] |= inside.astype(np.uint8)
        if site_label is not true_label and cut is not None:
            site_label[slices] |= (mask & (rho < cut)).astype(np.uint8)


def _ellipsoid_r2(
    coords: Sequence[np.ndarray], center: np.ndarray, radii: np.ndarray
) -> np.ndarray:
    return sum(((coords[d] - np.float32(center[d])) / np.float32(radii[d])) ** 2 for d in range(3))
