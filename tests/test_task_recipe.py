"""fedmed.task and fedmed.roundconfig: the loss, LAMP and preprocessing settings of a round,
the site's hardware (a LAMP model split over a device list), and the demo's clean labels in
validation."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from fedmed.errors import ConfigError
from fedmed.globalmodel import build_network, model_arrays
from fedmed.roundconfig import TrainConfig, trainer_config
from fedmed.scoring import evaluate_folder
from fedmed.task import CLEAN_LABELS_DIR, SiteTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COPLENET = TrainConfig(
    model="coplenet",
    model_features=(4, 8, 16, 32, 64),
    patch_size=(32, 32),
    local_steps=1,
    batch_size=2,
    val_fraction=0.34,
)
LAMP = TrainConfig(
    model="lamp_unet",
    model_features=(4, 8, 16),
    patch_size=(16, 16, 16),
    local_steps=2,
    batch_size=2,
    val_fraction=0.34,
)


def test_round_config_carries_the_loss_lamp_and_preprocessing_settings():
    cfg = dataclasses.replace(
        LAMP,
        loss="nr-dice",
        nr_gamma=2.0,
        nr_denominator="squared",
        self_ensembling=True,
        ema_decay=0.95,
        lamp_skips="none",
        target_spacing=(1.5, 1.5, 3.0),
        intensity="zscore",
        hu_window=(-500.0, 500.0),
    )
    config = cfg.to_config()
    assert (config["target-spacing"], config["hu-window"]) == ("1.5,1.5,3.0", "-500.0,500.0")
    assert TrainConfig.from_config(config) == cfg
    assert TrainConfig.from_config(LAMP.to_config()).target_spacing is None  # native


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("loss", "focal", "round config 'loss' is 'focal': the site knows auto, dice"),
        ("lamp-skips", "some", "'lamp-skips' is 'some'"),
        ("intensity", "minmax", "'intensity' is 'minmax'"),
        ("hu-window", "", "round config 'hu-window' is empty"),
        ("target-spacing", "a,b,c", "round config 'target-spacing' is invalid"),
    ],
    ids=["loss", "lamp-skips", "intensity", "hu-window", "target-spacing"],
)
def test_round_config_refuses_unknown_recipe_values(key, value, match):
    config = {**LAMP.to_config(), key: value}
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_config(config)


def test_auto_loss_is_the_models_own_and_the_settings_reach_the_trainer():
    # what federated training used before the loss was a setting
    assert trainer_config(COPLENET).loss == "nr_dice"
    assert trainer_config(LAMP).loss == "dice_ce"
    cfg = dataclasses.replace(
        LAMP,
        loss="nr-dice",
        nr_gamma=2.0,
        nr_denominator="squared",
        self_ensembling=True,
        ema_decay=0.9,
    )
    local = trainer_config(cfg)
    assert (local.loss, local.gamma, local.nr_denominator) == ("nr_dice", 2.0, "squared")
    assert (local.self_ensembling, local.ema_alpha) == (True, 0.9)


def test_the_plan_records_preprocessing_patch_and_model():
    cfg = dataclasses.replace(
        LAMP, lamp_skips="none", target_spacing=(2.0, 2.0, 4.0), intensity="zscore-nonzero"
    )
    plan = cfg.plan
    assert (plan.target_spacing, plan.patch_size, plan.model) == (
        (2.0, 2.0, 4.0),
        (16, 16, 16),
        "lamp_unet",
    )
    assert plan.model_options == {
        "in_channels": 1,
        "out_channels": 2,
        "features": [4, 8, 16],
        "skip_connections": False,
    }
    settings = plan.pipeline_settings(cache_mode="none")
    assert (settings.pixdim, settings.intensity) == ((2.0, 2.0, 4.0), "zscore-nonzero")
    assert COPLENET.plan.model_options["norm"] == "batch"


def test_lamp_skips_none_builds_the_skip_free_variant():
    carried = build_network(LAMP, seed=0)
    free = build_network(dataclasses.replace(LAMP, lamp_skips="none"), seed=0)
    assert carried.skip_connections and not free.skip_connections
    a, b = model_arrays(carried), model_arrays(free)
    assert set(a) == set(b) and any(a[k].shape != b[k].shape for k in a)


@pytest.fixture(scope="module")
def split_task(demo_root):
    """site-A on two CPU "devices": a LAMP model is split into two pipeline stages."""
    return SiteTask(demo_root / "site-A", val_fraction=LAMP.val_fraction, seed=0, device="cpu,cpu")


@pytest.mark.slow
def test_a_site_with_a_device_list_trains_lamp_split_over_it(split_task):
    # Prepare
    start = model_arrays(build_network(LAMP, seed=0))
    model = split_task.model(LAMP, start)
    assert len(model.placement.sizes) == 2
    # Execute: the trainer keeps the partition (no .to() onto one device)
    result = split_task.fit(model, LAMP)
    # Assert
    assert result.steps == 2 and len(model.placement.sizes) == 2
    arrays, metrics = split_task.train_round(start, LAMP)
    assert set(arrays) == set(start)  # the single-device model's keys: aggregation unchanged
    assert all(arrays[k].shape == start[k].shape for k in start)
    assert any(not np.array_equal(arrays[k], start[k]) for k in start)
    assert 0.0 <= metrics["val-dice"] <= 1.0  # evaluation runs on the partitioned model


@pytest.mark.slow
def test_self_ensembling_trains_a_round(split_task):
    cfg = dataclasses.replace(LAMP, loss="nr-dice", self_ensembling=True, ema_decay=0.9)
    start = model_arrays(build_network(cfg, seed=0))
    arrays, metrics = split_task.train_round(start, cfg)
    assert set(arrays) == set(start) and np.isfinite(metrics["train-loss"])


def test_a_device_list_for_a_model_that_cannot_be_split_names_device(split_task):
    start = model_arrays(build_network(COPLENET, seed=0))
    with pytest.raises(ConfigError, match="device lists 2 devices but COPLENet cannot be split"):
        split_task.model(COPLENET, start)


def test_a_device_this_machine_lacks_is_a_config_error(demo_root):
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ConfigError, match=f"device = 'cpu,{missing}': '{missing}' does not exist"):
        SiteTask(demo_root / "site-A", device=f"cpu,{missing}")


def test_held_out_evaluation_preprocesses_with_the_rounds_plan(demo_root):
    cfg = dataclasses.replace(COPLENET, target_spacing=(8.0, 8.0, 12.0))
    weights = model_arrays(build_network(cfg, seed=0))
    by_plan = evaluate_folder(weights, demo_root / "holdout", cfg, device="cpu")
    explicit = evaluate_folder(
        weights, demo_root / "holdout", cfg, device="cpu", settings=cfg.plan.pipeline_settings()
    )
    assert by_plan == explicit


def test_the_noisy_demo_site_also_scores_against_its_clean_labels(demo_root):
    weights = model_arrays(build_network(COPLENET, seed=0))
    noisy = SiteTask(demo_root / "site-C", val_fraction=0.34, seed=0, device="cpu")
    plain = SiteTask(demo_root / "site-A", val_fraction=0.34, seed=0, device="cpu")
    metrics = noisy.evaluate(noisy.model(COPLENET, weights), COPLENET)
    assert 0.0 <= metrics["dice-clean"] <= 1.0
    assert "dice-clean" not in plain.evaluate(plain.model(COPLENET, weights), COPLENET)


def test_clean_labels_equal_to_the_labels_give_the_same_dice(demo_root, tmp_path):
    # Prepare: a site whose "clean" labels are its labels
    site = tmp_path / "site"
    shutil.copytree(demo_root / "site-A", site)
    shutil.copytree(site / "labelsTr", site / CLEAN_LABELS_DIR)
    task = SiteTask(site, val_fraction=0.34, seed=0, device="cpu")
    model = task.model(COPLENET, model_arrays(build_network(COPLENET, seed=1)))
    # Execute
    metrics = task.evaluate(model, COPLENET)
    # Assert
    assert metrics["dice-clean"] == pytest.approx(metrics["dice"])
