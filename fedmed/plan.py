"""The preprocessing a model was trained with, recorded with it: one versioned schema.

A model is only usable on new scans with the preprocessing it saw in training: the voxel
spacing it was resampled to, the intensity normalization, the patch size of its sliding
window. :class:`PreprocessingPlan` holds them (and the model's name and options), is read
from the run settings (:meth:`~PreprocessingPlan.from_run_config`: ``target-spacing``,
``intensity``, ``hu-window``), travels in every checkpoint's metadata block under ``"plan"``
(:meth:`~PreprocessingPlan.to_metadata`: ``fedmed train`` checkpoints and the federated round
checkpoints' ``meta.json``) and rebuilds the site pipeline's settings
(:meth:`~PreprocessingPlan.pipeline_settings`). It is a plain, versioned record so that a
later data-fingerprint step (median spacing, intensity percentiles) can fill it in.

Schema, version 1 (JSON)::

    {"version": 1,
     "orientation": "RAS",
     "target_spacing": [1.0, 1.0, 2.5] | null,        # mm; null keeps the native spacing
     "intensity": {"kind": "ct-window", "low": -1000.0, "high": 400.0}
                | {"kind": "zscore", "nonzero": false},
     "patch_size": [96, 96] | [64, 64, 64],
     "model": "coplenet",
     "model_options": {"features": [...], "in_channels": 1, "out_channels": 2, ...}}

:meth:`~PreprocessingPlan.from_metadata` reads it back, and also reads checkpoints written
before plans existed (their ``pipeline`` and ``task_config`` blocks).

Example:
    >>> plan = PreprocessingPlan(target_spacing=(1.0, 1.0, 2.5), patch_size=(96, 96))
    >>> PreprocessingPlan.from_metadata({"round": 3, **plan.to_metadata()}, source="x") == plan
    True
    >>> plan.pipeline_settings(cache_mode="memory").pixdim
    (1.0, 1.0, 2.5)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedmed.errors import ConfigError, ModelError
from fedmed.pipeline import HU_WINDOW, INTENSITIES, PipelineSettings

__all__ = ["PLAN_KEY", "PLAN_VERSION", "CTWindow", "PreprocessingPlan", "ZScore"]

PLAN_VERSION = 1
PLAN_KEY = "plan"  # the plan's entry in a checkpoint's metadata block


@dataclass(frozen=True)
class CTWindow:
    """CT intensity: Hounsfield units ``[low, high]`` mapped to ``[0, 1]`` and clipped."""

    low: float = HU_WINDOW[0]
    high: float = HU_WINDOW[1]

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.high > self.low):
            raise ConfigError(
                f"CT window ({self.low}, {self.high}) must be (low, high) HU with high > low"
            )

    def to_dict(self) -> dict[str, Any]:
        """``{"kind": "ct-window", "low": ..., "high": ...}``."""
        return {"kind": "ct-window", "low": float(self.low), "high": float(self.high)}


@dataclass(frozen=True)
class ZScore:
    """MR intensity: subtract the volume's mean, divide by its standard deviation
    (over the non-zero voxels only with ``nonzero``, for skull-stripped scans)."""

    nonzero: bool = False

    def to_dict(self) -> dict[str, Any]:
        """``{"kind": "zscore", "nonzero": ...}``."""
        return {"kind": "zscore", "nonzero": bool(self.nonzero)}


Intensity = CTWindow | ZScore


def _intensity_name(intensity: Intensity) -> str:
    """The pipeline's (and the run setting's) name: ct-window, zscore or zscore-nonzero."""
    if isinstance(intensity, CTWindow):
        return "ct-window"
    return "zscore-nonzero" if intensity.nonzero else "zscore"


def _intensity_from_dict(data: Any, source: str) -> Intensity:
    if not isinstance(data, Mapping) or "kind" not in data:
        raise ModelError(f"{source}: plan intensity {data!r} must be an object with a 'kind'")
    kind = data["kind"]
    try:
        if kind == "ct-window":
            return CTWindow(float(data["low"]), float(data["high"]))
        if kind == "zscore":
            return ZScore(nonzero=bool(data.get("nonzero", False)))
    except (KeyError, TypeError, ValueError, ConfigError) as err:
        raise ModelError(f"{source}: plan intensity {dict(data)!r} is invalid ({err})") from err
    raise ModelError(
        f"{source}: plan intensity kind {kind!r} is unknown: this fedmed reads ct-window and "
        "zscore; update fedmed to read this checkpoint"
    )


@dataclass(frozen=True)
class PreprocessingPlan:
    """What a model expects of its input (see the module docstring for the JSON schema).

    Args:
        target_spacing: voxel size (mm) every scan is resampled to; ``None`` keeps the native
            spacing.
        intensity: :class:`CTWindow` or :class:`ZScore`.
        patch_size: the training patch (2 sizes: COPLE-Net slices; 3: U-Net windows).
        model, model_options: the network's name and ``build_model`` options.
        orientation: the axis codes volumes are reoriented to.
        version: the schema version; only :data:`PLAN_VERSION` is written.

    Invalid values raise ``ConfigError``.
    """

    target_spacing: tuple[float, float, float] | None = None
    intensity: Intensity = field(default_factory=CTWindow)
    patch_size: tuple[int, ...] = (96, 96)
    model: str = "coplenet"
    model_options: Mapping[str, Any] = field(default_factory=dict)
    orientation: str = "RAS"
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if self.version != PLAN_VERSION:
            raise ConfigError(
                f"preprocessing plan version {self.version!r} is unknown: this fedmed writes "
                f"and reads version {PLAN_VERSION}"
            )
        if self.target_spacing is not None:
            spacing = tuple(float(s) for s in self.target_spacing)
            if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
                raise ConfigError(
                    f"target spacing {self.target_spacing} must be three positive sizes in mm"
                )
            object.__setattr__(self, "target_spacing", spacing)
        patch = tuple(int(s) for s in self.patch_size)
        if len(patch) not in (2, 3) or min(patch) < 1:
            raise ConfigError(f"patch size {self.patch_size} must be 2 or 3 sizes >= 1")
        object.__setattr__(self, "patch_size", patch)
        if not isinstance(self.intensity, (CTWindow, ZScore)):
            raise ConfigError(
                f"intensity {self.intensity!r} must be CTWindow(low, high) or ZScore()"
            )
        # JSON values (tuples as lists), so a plan equals itself read back from a checkpoint
        object.__setattr__(self, "model_options", _json_options(self.model_options))

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON values, for checkpoint metadata (``meta["plan"]``)."""
        return {
            "version": self.version,
            "orientation": self.orientation,
            "target_spacing": list(self.target_spacing) if self.target_spacing else None,
            "intensity": self.intensity.to_dict(),
            "patch_size": list(self.patch_size),
            "model": self.model,
            "model_options": dict(self.model_options),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "plan") -> PreprocessingPlan:
        """Read :meth:`to_dict`'s output; ``ModelError`` names ``source`` for an unknown
        version or a malformed entry."""
        if not isinstance(data, Mapping):
            raise ModelError(f"{source}: the preprocessing plan must be an object, got {data!r}")
        version = data.get("version")
        if version != PLAN_VERSION:
            raise ModelError(
                f"{source}: preprocessing plan version {version!r} is unknown (this fedmed "
                f"reads version {PLAN_VERSION}): update fedmed, or re-export the checkpoint"
            )
        try:
            spacing = data.get("target_spacing")
            return cls(
                target_spacing=tuple(spacing) if spacing else None,
                intensity=_intensity_from_dict(data.get("intensity"), source),
                patch_size=tuple(data["patch_size"]),
                model=str(data["model"]),
                model_options=dict(data.get("model_options") or {}),
                orientation=str(data.get("orientation", "RAS")),
                version=version,
            )
        except (KeyError, TypeError, ValueError, ConfigError) as err:
            raise ModelError(f"{source}: the preprocessing plan is invalid ({err})") from err

    def to_metadata(self) -> dict[str, Any]:
        """``{"plan": ...}``, to merge into a checkpoint's metadata block (or ``meta.json``)."""
        return {PLAN_KEY: self.to_dict()}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], *, source: str) -> PreprocessingPlan | None:
        """The plan in checkpoint metadata ``meta``, or None when it records none.

        Reads ``meta["plan"]``; for checkpoints written before plans existed, builds it from
        the old ``pipeline`` block (``hu_window``, ``pixdim``) and ``task_config`` (``model``,
        ``patch-size``). ``ModelError`` names ``source`` (the file) for a bad block.
        """
        if PLAN_KEY in meta:
            return cls.from_dict(meta[PLAN_KEY], source=source)
        if "pipeline" not in meta:
            return None
        pipe = meta.get("pipeline") or {}
        task = meta.get("task_config") or {}
        try:
            patch = tuple(int(v) for v in str(task.get("patch-size", "")).split(",") if v.strip())
            spacing = pipe.get("pixdim")
            return cls(
                target_spacing=tuple(spacing) if spacing else None,
                intensity=CTWindow(*pipe.get("hu_window", HU_WINDOW)),
                patch_size=patch or (96, 96),
                model=str(task.get("model", meta.get("model", "coplenet"))),
            )
        except (TypeError, ValueError, ConfigError) as err:
            raise ModelError(f"{source}: the pipeline metadata is invalid ({err})") from err

    @classmethod
    def from_run_config(
        cls,
        values: Mapping[str, Any],
        *,
        patch_size: Sequence[int],
        model: str,
        model_options: Mapping[str, Any] | None = None,
        source: str = "run config",
    ) -> PreprocessingPlan:
        """The plan of the run settings ``target-spacing``, ``intensity`` and ``hu-window``.

        ``target-spacing``: three sizes in mm (``"1.0,1.0,2.5"`` or a list), or ``""`` /
        ``"native"`` (the default) to keep each scan's spacing; ``intensity``: ``ct-window``
        (the default), ``zscore`` or ``zscore-nonzero``; ``hu-window``: ``"low,high"`` HU
        (default ``-1000,400``). Other keys are ignored. ``ConfigError`` names ``source``
        and the key.

        Example:
            >>> PreprocessingPlan.from_run_config(
            ...     {"target-spacing": "0.8,0.8,2.5"}, patch_size=(96, 96), model="coplenet")
        """
        spacing = _numbers(values, "target-spacing", 3, source=source)
        window = _numbers(values, "hu-window", 2, source=source) or HU_WINDOW
        name = str(values.get("intensity", "ct-window")).strip().lower()
        if name not in INTENSITIES:
            raise ConfigError(
                f"{source}: intensity = {name!r} is unknown: use {', '.join(INTENSITIES)}"
            )
        try:
            intensity: Intensity = (
                CTWindow(*window) if name == "ct-window" else ZScore(name == "zscore-nonzero")
            )
            return cls(
                target_spacing=spacing,  # type: ignore[arg-type]
                intensity=intensity,
                patch_size=tuple(patch_size),
                model=model,
                model_options=model_options or {},
            )
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_settings(
        cls,
        settings: PipelineSettings,
        *,
        patch_size: Sequence[int],
        model: str,
        model_options: Mapping[str, Any] | None = None,
    ) -> PreprocessingPlan:
        """The plan of a site pipeline (``PipelineSettings``: spacing and intensity)."""
        intensity: Intensity = (
            CTWindow(*settings.hu_window)
            if settings.intensity == "ct-window"
            else ZScore(nonzero=settings.intensity == "zscore-nonzero")
        )
        return cls(
            target_spacing=settings.pixdim,
            intensity=intensity,
            patch_size=tuple(patch_size),
            model=model,
            model_options=model_options or {},
        )

    def pipeline_settings(self, **cache: Any) -> PipelineSettings:
        """The site pipeline's settings for this plan; ``cache`` passes ``cache_mode``,
        ``cache_dir``, ``cache_key``, ``num_workers`` through."""
        window = self.intensity if isinstance(self.intensity, CTWindow) else CTWindow()
        return PipelineSettings(
            hu_window=(window.low, window.high),
            pixdim=self.target_spacing,
            intensity=_intensity_name(self.intensity),
            **cache,
        )


def _numbers(
    values: Mapping[str, Any], key: str, count: int, *, source: str
) -> tuple[float, ...] | None:
    """``values[key]`` as ``count`` floats (text ``"a,b,c"`` or a list); None when absent,
    empty or ``native``."""
    raw = values.get(key)
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "native")):
        return None
    parts = raw.split(",") if isinstance(raw, str) else raw
    try:
        numbers = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        example = "1.0,1.0,2.5" if count == 3 else "-1000,400"
        raise ConfigError(
            f"{source}: {key} = {raw!r} must be {count} comma-separated numbers, e.g. {example!r}"
        )
    return numbers


def _json_options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
