"""PreprocessingPlan: JSON round trip, version refusal, pipeline settings, old metadata."""

from __future__ import annotations

import json

import pytest

from fedmed.errors import ConfigError, ModelError
from fedmed.pipeline import PipelineSettings
from fedmed.plan import PLAN_KEY, CTWindow, PreprocessingPlan, ZScore

PLAN = PreprocessingPlan(
    target_spacing=(0.8, 0.8, 2.5),
    intensity=CTWindow(-1000.0, 400.0),
    patch_size=(64, 64, 64),
    model="lamp_unet",
    model_options={"features": (16, 32, 64), "skip_connections": False},
)


@pytest.mark.parametrize(
    "plan",
    [PLAN, PreprocessingPlan(), PreprocessingPlan(intensity=ZScore(nonzero=True))],
    ids=["ct-lamp", "defaults", "zscore"],
)
def test_plan_round_trips_through_json(plan: PreprocessingPlan) -> None:
    data = json.loads(json.dumps(plan.to_dict()))
    assert PreprocessingPlan.from_dict(data) == plan
    assert data["version"] == 1


def test_pipeline_settings_carry_spacing_and_window_and_pass_cache_options() -> None:
    settings = PLAN.pipeline_settings(cache_mode="none")
    assert settings == PipelineSettings(
        hu_window=(-1000.0, 400.0), pixdim=(0.8, 0.8, 2.5), cache_mode="none"
    )
    assert (
        PreprocessingPlan.from_settings(
            settings, patch_size=(64, 64, 64), model="lamp_unet", model_options=PLAN.model_options
        )
        == PLAN
    )


@pytest.mark.parametrize(
    ("intensity", "name"),
    [(ZScore(), "zscore"), (ZScore(nonzero=True), "zscore-nonzero")],
    ids=["zscore", "nonzero"],
)
def test_a_zscore_plan_gives_a_zscore_pipeline_and_back(intensity: ZScore, name: str) -> None:
    plan = PreprocessingPlan(intensity=intensity, patch_size=(96, 96))
    settings = plan.pipeline_settings()
    assert settings.intensity == name
    assert PreprocessingPlan.from_settings(settings, patch_size=(96, 96), model="coplenet") == plan


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"version": 2}, r"ckpt\.safetensors: preprocessing plan version 2 is unknown"),
        ({"version": None}, "preprocessing plan version None is unknown"),
        ({"intensity": {"kind": "histogram"}}, "intensity kind 'histogram' is unknown"),
        ({"intensity": {"kind": "ct-window", "low": 5}}, "plan intensity .* is invalid"),
        ({"target_spacing": [1.0, -1.0, 1.0]}, "target spacing .* must be three positive"),
        ({"patch_size": [96]}, r"patch size \(96,\) must be 2 or 3 sizes"),
    ],
    ids=["future", "missing-version", "kind", "window", "spacing", "patch"],
)
def test_from_dict_refuses_bad_plans_naming_the_source(change: dict, match: str) -> None:
    data = {**PLAN.to_dict(), **change}
    with pytest.raises(ModelError, match=match):
        PreprocessingPlan.from_dict(data, source="ckpt.safetensors")


def test_constructor_refuses_an_unknown_version() -> None:
    with pytest.raises(ConfigError, match="plan version 3 is unknown"):
        PreprocessingPlan(version=3)


def test_metadata_without_a_plan_block_reads_the_old_pipeline_block() -> None:
    old = {
        "pipeline": {"hu_window": [-1200.0, 300.0], "pixdim": [1.0, 1.0, 2.0]},
        "task_config": {"model": "unet3d", "patch-size": "32,32,16"},
    }
    plan = PreprocessingPlan.from_metadata(old, source="old.safetensors")
    assert plan == PreprocessingPlan(
        target_spacing=(1.0, 1.0, 2.0),
        intensity=CTWindow(-1200.0, 300.0),
        patch_size=(32, 32, 16),
        model="unet3d",
    )
    assert PreprocessingPlan.from_metadata({"round": 3}, source="meta.json") is None


def test_the_plan_travels_in_a_metadata_block_under_its_key() -> None:
    meta = {"round": 3, **PLAN.to_metadata()}
    assert meta[PLAN_KEY] == PLAN.to_dict() and PLAN_KEY == "plan"
    assert PreprocessingPlan.from_metadata(json.loads(json.dumps(meta)), source="m") == PLAN
    with pytest.raises(ModelError, match=r"^meta\.json: preprocessing plan version 7"):
        PreprocessingPlan.from_metadata({"plan": {"version": 7}}, source="meta.json")


def test_run_settings_give_the_plan() -> None:
    # Prepare
    values = {"target-spacing": "0.8, 0.8, 2.5", "hu-window": [-1000, 400], "lr": 0.1}
    # Execute
    plan = PreprocessingPlan.from_run_config(
        values, patch_size=(64, 64, 64), model="lamp_unet", model_options=PLAN.model_options
    )
    # Assert
    assert plan == PLAN
    defaults = PreprocessingPlan.from_run_config({}, patch_size=(96, 96), model="coplenet")
    assert defaults == PreprocessingPlan()
    native = {"target-spacing": "native", "intensity": "zscore-nonzero"}
    plan = PreprocessingPlan.from_run_config(native, patch_size=(96, 96), model="coplenet")
    assert plan.target_spacing is None and plan.intensity == ZScore(nonzero=True)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"target-spacing": "1,1"}, "target-spacing = '1,1' must be 3 comma-separated numbers"),
        ({"target-spacing": "1,x,1"}, "target-spacing = '1,x,1' must be 3"),
        ({"target-spacing": "1,0,1"}, "target spacing .* must be three positive sizes"),
        ({"hu-window": "400,-1000"}, r"CT window \(400.0, -1000.0\) must be"),
        ({"intensity": "minmax"}, "intensity = 'minmax' is unknown: use ct-window, zscore"),
    ],
    ids=["spacing-count", "spacing-text", "spacing-zero", "window", "intensity"],
)
def test_bad_run_settings_name_the_source_and_key(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=f"^run config: {match}"):
        PreprocessingPlan.from_run_config(values, patch_size=(96, 96), model="coplenet")


def test_public_api_is_pinned() -> None:
    import fedmed.plan as module

    assert sorted(module.__all__) == [
        "CTWindow",
        "PLAN_KEY",
        "PLAN_VERSION",
        "PreprocessingPlan",
        "ZScore",
    ]
    assert all(hasattr(module, name) for name in module.__all__)
