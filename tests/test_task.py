"""fedmed.task with fedmed.roundconfig, fedmed.globalmodel and fedmed.scoring: round config,
model arrays, FedBN keys, one local round, folder evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedmed.errors import ConfigError, ModelError
from fedmed.globalmodel import build_network, load_arrays, local_norm_keys, model_arrays
from fedmed.io.nifti import read_nifti_header
from fedmed.metrics import image_diagonal_mm
from fedmed.pipeline import PipelineSettings, cached_volumes, load_cases
from fedmed.predict import adapt_norm_statistics, predict_volume
from fedmed.roundconfig import TrainConfig
from fedmed.scoring import evaluate_folder, evaluate_model
from fedmed.task import SiteTask, site_volume_mm3

SMALL = TrainConfig(
    model="coplenet",
    model_features=(4, 8, 16, 32, 64),
    patch_size=(32, 32),
    local_steps=2,
    batch_size=2,
    val_fraction=0.34,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_train_config_round_trips_and_names_missing_keys():
    assert TrainConfig.from_config(SMALL.to_config()) == SMALL
    config = SMALL.to_config()
    del config["lr"]
    with pytest.raises(ConfigError, match="round config lacks 'lr'"):
        TrainConfig.from_config(config)


def test_build_network_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = model_arrays(build_network(SMALL, seed=5))
    after = torch.rand(1)
    b = model_arrays(build_network(SMALL, seed=5))
    assert before == after
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_local_norm_keys_are_the_batchnorm_statistics_only():
    # SiloBN: affine weights (and group/instance norm, which keep no statistics) are shared
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.GroupNorm(1, 2))
    assert local_norm_keys(model) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}


def test_local_norm_keys_of_coplenet_leave_every_parameter_shared():
    model = build_network(SMALL)
    keys = local_norm_keys(model)
    params = {name for name, _ in model.named_parameters()}
    assert keys and keys < set(model.state_dict()) and not keys & params


def test_local_norm_keys_of_the_unets_are_empty():
    # instance norm keeps no running statistics: under fedbn every array is shared
    assert not local_norm_keys(build_network(TrainConfig(model="unet3d", patch_size=(16,) * 3)))


def test_load_arrays_refuses_wrong_shapes_and_keys():
    model = build_network(SMALL)
    arrays = model_arrays(model)
    key = next(k for k in arrays if k.endswith("weight"))
    with pytest.raises(ModelError, match=f"weight '{key}' has shape"):
        load_arrays(model, {**arrays, key: np.zeros((1,), np.float32)})
    with pytest.raises(ModelError, match="unknown keys \\['bogus'\\]"):
        load_arrays(model, {**arrays, "bogus": np.zeros(1, np.float32)})
    with pytest.raises(ModelError, match="missing keys"):
        load_arrays(model, {key: arrays[key]})
    load_arrays(model, {key: arrays[key]}, partial=True)


def test_predict_volume_keeps_the_volume_shape():
    model = build_network(SMALL, seed=0)
    pred = predict_volume(model, torch.rand(1, 40, 24, 5), SMALL)
    assert pred.shape == (40, 24, 5)


@pytest.fixture(scope="module")
def site_task(demo_root):
    return SiteTask(demo_root / "site-A", val_fraction=SMALL.val_fraction, seed=0, device="cpu")


@pytest.mark.slow
def test_train_round_returns_every_array_and_scalar_metrics(site_task):
    # Prepare
    start = model_arrays(build_network(SMALL, seed=0))
    # Execute
    arrays, metrics = site_task.train_round(start, SMALL)
    # Assert
    assert set(arrays) == set(start)
    assert all(
        arrays[k].shape == start[k].shape and arrays[k].dtype == start[k].dtype for k in start
    )
    assert any(not np.array_equal(arrays[k], start[k]) for k in start)
    assert metrics["num-steps"] == 2
    # the aggregation weight is the site's training cases; the samples trained on beside it
    assert metrics["num-examples"] == site_task.num_train_cases
    assert metrics["num-samples"] == 2 * SMALL.batch_size
    assert 0.0 <= metrics["val-dice"] <= 1.0
    assert 0.0 <= metrics["val-nsd"] <= 1.0
    assert metrics["val-n_cases"] == site_task.num_val_cases
    assert all(isinstance(v, (int, float)) for v in metrics.values())


@pytest.mark.slow
def test_train_round_is_deterministic(site_task):
    start = model_arrays(build_network(SMALL, seed=0))
    a, _ = site_task.train_round(start, SMALL)
    b, _ = site_task.train_round(start, SMALL)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_voxels_weight_is_the_training_images_volume(site_task):
    cfg = TrainConfig(**{**SMALL.__dict__, "aggregation_weight": "voxels"})
    expected = site_volume_mm3(site_task.train_cases)
    assert site_task.aggregation_weight(cfg) == pytest.approx(expected)
    shape, affine = read_nifti_header(site_task.train_cases[0]["image"])
    one = np.prod(shape[:3]) * abs(np.linalg.det(affine[:3, :3]))
    assert expected == pytest.approx(one * site_task.num_train_cases, rel=0.5)


@pytest.mark.slow
def test_fedbn_local_statistics_are_loaded_before_training(site_task):
    # Prepare: the server sends everything but the statistics, the site has its own
    model = build_network(SMALL, seed=0)
    norm = local_norm_keys(model)
    full = model_arrays(model)
    shared = {k: v for k, v in full.items() if k not in norm}
    local = {k: (v + 1 if v.dtype.kind == "f" else v) for k, v in full.items() if k in norm}
    # Execute
    with_local, _ = site_task.train_round(shared, SMALL, local_arrays=local)
    without, _ = site_task.train_round(shared, SMALL)
    # Assert: the site's own layers changed the outcome
    key = next(k for k in norm if k.endswith("running_var"))
    assert not np.allclose(with_local[key], without[key])


def test_evaluate_folder_reports_each_case_with_counts(demo_root):
    weights = model_arrays(build_network(SMALL, seed=0))
    result = evaluate_folder(weights, demo_root / "holdout", SMALL, device="cpu")
    assert [c["case"] for c in result["cases"]] == ["holdout_patient_000", "holdout_patient_001"]
    assert 0.0 <= result["dice"] <= 1.0 and 0.0 <= result["nsd"] <= 1.0
    assert result["n_cases"] == 2 and result["dice_n"] == 2
    assert result["n_missed"] + result["n_spurious"] + result["n_both_empty"] <= 2
    case_keys = {"case", "dice", "hd95", "nsd", "rve", "missed", "spurious", "both_empty"}
    assert all(set(c) == case_keys for c in result["cases"])


class _Constant(nn.Module):
    """Predicts class ``winner`` at every pixel (2D logits, as COPLE-Net gives them)."""

    def __init__(self, out_channels: int, winner: int) -> None:
        super().__init__()
        self.out_channels, self.winner = out_channels, winner
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], self.out_channels, *x.shape[2:])
        logits[:, self.winner] = 4.0
        return logits + self.bias


@pytest.fixture(scope="module")
def holdout_volumes(demo_root):
    return cached_volumes(load_cases([demo_root / "holdout"]), PipelineSettings())


def test_a_model_that_predicts_nothing_scores_the_worst_hd95_not_nan(holdout_volumes):
    # Execute
    result = evaluate_model(_Constant(2, winner=0), holdout_volumes, SMALL)
    # Assert: every lesion missed, each scored at its image diagonal and counted
    for index, case in enumerate(result["cases"]):
        item = holdout_volumes[index]
        diagonal = image_diagonal_mm(item["label"].shape[1:], item["image_meta"]["spacing"])
        assert case["hd95"] == pytest.approx(diagonal)
        assert (case["dice"], case["nsd"], case["rve"], case["missed"]) == (0.0, 0.0, -1.0, 1)
    assert (result["n_cases"], result["n_missed"], result["hd95_n"], result["nsd_n"]) == (
        2,
        2,
        2,
        2,
    )
    assert result["hd95"] > 10.0 and result["nsd"] == 0.0


def test_evaluate_model_passes_the_nsd_tolerance(holdout_volumes):
    everywhere = _Constant(2, winner=1)  # surface = the image border, far from the lesions
    strict = evaluate_model(everywhere, holdout_volumes, SMALL, nsd_tolerance_mm=0.0)
    loose = evaluate_model(everywhere, holdout_volumes, SMALL, nsd_tolerance_mm=math.inf)
    assert strict["nsd"] < 0.5 and loose["nsd"] == 1.0
    assert strict["hd95"] == loose["hd95"] and strict["n_missed"] == 0


def test_evaluate_model_keeps_per_class_keys_for_more_than_two_classes(holdout_volumes):
    # Prepare: three classes, the model predicts class 2 everywhere; labels hold only class 1
    cfg = TrainConfig(**{**SMALL.__dict__, "out_channels": 3})
    # Execute
    result = evaluate_model(_Constant(3, winner=2), holdout_volumes, cfg)
    # Assert: class 1 missed, class 2 spurious, in each case record and in the counts
    case = result["cases"][0]
    assert (case["missed_1"], case["spurious_2"], case["missed"], case["spurious"]) == (
        True,
        True,
        1,
        1,
    )
    assert case["dice_1"] == 0.0 and case["nsd_2"] == 0.0 and math.isnan(case["rve_2"])
    assert case["hd95"] == pytest.approx((case["hd95_1"] + case["hd95_2"]) / 2)
    assert (result["n_missed"], result["n_spurious"], result["n_missed_1"]) == (2, 2, 2)
    assert result["dice_2_n"] == 2 and result["rve_2_n"] == 0


def test_adapt_norm_statistics_estimates_batchnorm_from_images():
    # Prepare: fresh running statistics (mean 0, var 1), images with mean about 5
    model = build_network(SMALL, seed=0)
    images = [torch.full((1, 32, 32, 4), 5.0) + torch.rand(1, 32, 32, 4)]
    first_bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = {k: v.clone() for k, v in model.state_dict().items() if "conv" in k}
    # Execute
    adapt_norm_statistics(model, images, SMALL)
    # Assert: statistics moved, weights did not, and the model is left in eval mode
    assert not torch.allclose(first_bn.running_mean, torch.zeros_like(first_bn.running_mean))
    assert first_bn.momentum == 0.1 and not model.training
    after = model.state_dict()
    assert all(
        torch.equal(before[k], after[k])
        for k in before
        if "running" not in k and "num_batches" not in k
    )


def test_evaluate_folder_with_adapted_norm_layers(demo_root):
    model = build_network(SMALL, seed=0)
    norm = local_norm_keys(model)
    shared = {k: v for k, v in model_arrays(model).items() if k not in norm}
    result = evaluate_folder(shared, demo_root / "holdout", SMALL, device="cpu", adapt_norm=True)
    assert len(result["cases"]) == 2 and 0.0 <= result["dice"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("model", ["unet3d", "lamp_unet"])
def test_unets_train_on_3d_patches(site_task, model):
    cfg = TrainConfig(
        model=model, model_features=(4, 8), patch_size=(16, 16, 16), local_steps=1, batch_size=2
    )
    start = model_arrays(build_network(cfg, seed=0))
    arrays, metrics = site_task.train_round(start, cfg)
    assert set(arrays) == set(start)
    assert metrics["num-examples"] == site_task.num_train_cases
    assert metrics["num-samples"] == cfg.batch_size
