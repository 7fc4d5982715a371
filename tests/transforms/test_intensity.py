from __future__ import annotations

import pytest
import torch

from fedmed.transforms import (
    NormalizeIntensityd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
)


def test_ct_window_clips_and_maps_to_unit_range():
    hu = torch.tensor([[-2000.0, -1000.0, -300.0, 400.0, 3000.0]])

    out = ScaleIntensityRanged("image", a_min=-1000.0, a_max=400.0)({"image": hu})["image"]

    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0]]))


def test_ct_window_matches_monai(permuted_item):
    monai_transforms = pytest.importorskip("monai.transforms")
    options = {"a_min": -1000.0, "a_max": 500.0, "b_min": -1.0, "b_max": 2.0, "clip": True}

    ours = ScaleIntensityRanged("image", **options)(permuted_item)["image"]
    theirs = monai_transforms.ScaleIntensityRanged("image", **options)(
        {"image": permuted_item["image"].clone()}
    )["image"]

    torch.testing.assert_close(ours, torch.as_tensor(theirs).as_subclass(torch.Tensor))


def test_ct_window_does_not_modify_its_input(permuted_item):
    before = permuted_item["image"].clone()

    ScaleIntensityRanged("image", a_min=-1000.0, a_max=500.0)(permuted_item)

    assert torch.equal(permuted_item["image"], before)


def test_ct_window_rejects_empty_range():
    with pytest.raises(ValueError, match="a_max must be above a_min"):
        ScaleIntensityRanged("image", a_min=10.0, a_max=10.0)


RANDOM_INTENSITY = [
    pytest.param(lambda: RandScaleIntensityd("image", factors=0.2, prob=1.0), id="scale"),
    pytest.param(lambda: RandShiftIntensityd("image", offsets=0.2, prob=1.0), id="shift"),
    pytest.param(lambda: RandGaussianNoised("image", std=0.2, prob=1.0), id="noise"),
]


@pytest.mark.parametrize("build", RANDOM_INTENSITY)
def test_random_intensity_is_reproducible_with_a_seed_and_varies_across_seeds(item, build):
    first = build().set_random_state(7)(item)["image"]
    again = build().set_random_state(7)(item)["image"]
    other = build().set_random_state(8)(item)["image"]

    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, item["image"])


@pytest.mark.parametrize("build", RANDOM_INTENSITY)
def test_random_intensity_with_prob_zero_changes_nothing(item, build):
    transform = build()
    transform.prob = 0.0

    assert torch.equal(transform(item)["image"], item["image"])


def test_scale_intensity_factor_stays_in_range(item):
    transform = RandScaleIntensityd("image", factors=(0.1, 0.3), prob=1.0).set_random_state(0)
    mask = item["image"] > 0
    for _ in range(20):
        ratio = transform(item)["image"][mask] / item["image"][mask]
        assert 1.1 <= float(ratio.mean()) < 1.3


def test_noise_std_matches_the_request_on_average(item):
    transform = RandGaussianNoised("image", std=0.2, prob=1.0).set_random_state(0)
    stds = [float((transform(item)["image"] - item["image"]).std()) for _ in range(40)]
    # s ~ U(0, 0.2): mean 0.1
    assert 0.07 < sum(stds) / len(stds) < 0.13


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RandScaleIntensityd("image", factors=-0.1), "factors must be >= 0"),
        (lambda: RandShiftIntensityd("image", offsets=(0.3, 0.1)), "offsets must be"),
        (lambda: RandGaussianNoised("image", std=-1.0), "std must be >= 0"),
        (lambda: RandGaussianNoised("image", prob=1.5), "prob must be in"),
    ],
    ids=["factors", "offsets", "std", "prob"],
)
def test_invalid_parameters_name_them(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("nonzero", [False, True], ids=["all", "nonzero"])
def test_z_score_matches_monai(permuted_item, nonzero):
    monai_transforms = pytest.importorskip("monai.transforms")
    image = permuted_item["image"].clone()
    image[..., :2] = 0.0  # background for the nonzero variant

    ours = NormalizeIntensityd("image", nonzero=nonzero)({"image": image})["image"]
    theirs = monai_transforms.NormalizeIntensityd("image", nonzero=nonzero)(
        {"image": image.clone()}
    )["image"]

    torch.testing.assert_close(ours, torch.as_tensor(theirs).as_subclass(torch.Tensor))
    values = ours[image != 0] if nonzero else ours
    assert abs(float(values.mean())) < 1e-5 and abs(float(values.std(unbiased=False)) - 1) < 1e-4
