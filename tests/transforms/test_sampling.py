from __future__ import annotations

import pytest
import torch

from fedmed.errors import DataError
from fedmed.transforms import FgBgToIndicesd, RandCropByPosNegLabeld, fg_bg_indices, invert

KEYS = ("image", "label")


@pytest.fixture
def cube() -> dict:
    """A 40^3 volume whose foreground is the 4^3 block in the middle."""
    label = torch.zeros(1, 40, 40, 40, dtype=torch.uint8)
    label[:, 18:22, 18:22, 18:22] = 1
    return {"image": torch.rand(1, 40, 40, 40), "label": label}


def _centre_labels(samples: list[dict], size: int) -> list[int]:
    return [int(s["label"][0, size // 2, size // 2, size // 2]) for s in samples]


def test_crop_returns_a_list_of_patches_with_recorded_boxes(item):
    crop = RandCropByPosNegLabeld(KEYS, "label", (8, 8, 6), num_samples=3).set_random_state(0)

    samples = crop(item)

    assert isinstance(samples, list) and len(samples) == 3
    for sample in samples:
        assert sample["image"].shape == (1, 8, 8, 6) and sample["label"].shape == (1, 8, 8, 6)
        step = sample["image_meta"]["history"][-1]
        assert step["name"] == "SpatialCropd"
        assert step["params"]["end"][0] - step["params"]["start"][0] == 8
        assert sample["label_meta"]["history"][-1] == step
        start = torch.tensor([*step["params"]["start"], 1.0], dtype=torch.float64)
        torch.testing.assert_close(
            sample["image_meta"]["affine"][:, 3], item["image_meta"]["affine"] @ start
        )


def test_crop_patches_are_views_of_the_input(item):
    samples = RandCropByPosNegLabeld(KEYS, "label", (8, 8, 6), num_samples=2)(item)

    for sample in samples:
        for key in KEYS:
            assert sample[key].untyped_storage().data_ptr() == (
                item[key].untyped_storage().data_ptr()
            )


def test_pos_neg_ratio_is_respected(cube):
    crop = RandCropByPosNegLabeld(KEYS, "label", (8, 8, 8), pos=3.0, neg=1.0, num_samples=400)

    centres = _centre_labels(crop.set_random_state(0)(cube), 8)

    fraction = sum(centres) / len(centres)
    assert 0.65 < fraction < 0.85


def test_neg_only_never_centres_on_foreground(cube):
    crop = RandCropByPosNegLabeld(KEYS, "label", (8, 8, 8), pos=0.0, neg=1.0, num_samples=100)

    assert sum(_centre_labels(crop(cube), 8)) == 0


def test_precomputed_indices_are_used_and_dropped_from_patches(cube):
    flat = 10 * 40 * 40 + 11 * 40 + 12  # voxel (10, 11, 12)
    cube["label_fg_indices"] = torch.tensor([flat], dtype=torch.int32)
    cube["label_bg_indices"] = torch.tensor([flat], dtype=torch.int32)
    crop = RandCropByPosNegLabeld(KEYS, "label", (8, 8, 8), num_samples=5)

    samples = crop(cube)

    for sample in samples:
        assert "label_fg_indices" not in sample and "label_bg_indices" not in sample
        assert torch.equal(sample["image"], cube["image"][:, 6:14, 7:15, 8:16])


def test_precomputed_and_computed_indices_give_the_same_patches(item):
    crop = RandCropByPosNegLabeld(KEYS, "label", (8, 8, 4), num_samples=4)
    cached = FgBgToIndicesd("label")(item)

    computed = crop.set_random_state(5)(item)
    precomputed = crop.set_random_state(5)(cached)

    for a, b in zip(computed, precomputed, strict=True):
        assert torch.equal(a["image"], b["image"])


def test_indices_split_foreground_and_background(item):
    fg, bg = fg_bg_indices(item["label"])

    assert fg.dtype == torch.int32
    assert len(fg) + len(bg) == item["label"][0].numel()
    assert torch.all(item["label"].flatten()[fg.long()] > 0)
    assert torch.all(item["label"].flatten()[bg.long()] == 0)


def test_indices_with_image_threshold_drop_background_outside_the_body(item):
    _, bg = fg_bg_indices(item["label"], item["image"], image_threshold=0.0)

    assert torch.all(item["image"].flatten()[bg.long()] > 0)


def test_slice_mode_squeezes_depth_for_two_dimensional_networks(item):
    crop = RandCropByPosNegLabeld(
        KEYS, "label", (12, 10, 1), num_samples=4, squeeze_depth=True
    ).set_random_state(0)

    samples = crop(item)

    for sample in samples:
        assert sample["image"].shape == (1, 12, 10)
        assert sample["label"].shape == (1, 12, 10)


def test_minus_one_takes_the_whole_axis(item):
    samples = RandCropByPosNegLabeld(KEYS, "label", (-1, -1, 1))(item)

    assert samples[0]["image"].shape == (1, 20, 16, 1)


def test_patch_can_be_mapped_back_to_the_original_grid(item):
    sample = RandCropByPosNegLabeld(KEYS, "label", (8, 8, 6))(item)[0]

    back = invert(sample, "label")

    assert back["label"].shape == item["label"].shape
    torch.testing.assert_close(back["label_meta"]["affine"], item["label_meta"]["affine"])
    box = sample["label_meta"]["history"][-1]["params"]
    region = tuple(slice(s, e) for s, e in zip(box["start"], box["end"], strict=True))
    assert torch.equal(back["label"][(slice(None), *region)], sample["label"])


def test_patch_larger_than_the_item_suggests_padding(item):
    crop = RandCropByPosNegLabeld(KEYS, "label", (32, 8, 8))

    with pytest.raises(DataError, match=r"larger than the item's spatial shape.*SpatialPadd"):
        crop(item)


def test_missing_label_key_is_named(item):
    crop = RandCropByPosNegLabeld(KEYS, "seg", (8, 8, 8))

    with pytest.raises(DataError, match="label_key 'seg' is not in the data item"):
        crop(item)


def test_mismatched_image_and_label_grids_are_named(item):
    broken = {**item, "image": item["image"][:, :-1]}

    with pytest.raises(DataError, match="'image' has spatial shape"):
        RandCropByPosNegLabeld(KEYS, "label", (8, 8, 8))(broken)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pos": 0.0, "neg": 0.0}, "pos and neg"),
        ({"num_samples": 0}, "num_samples must be an integer >= 1"),
        ({"squeeze_depth": True}, "squeeze_depth needs spatial_size with 1"),
    ],
    ids=["ratio", "num_samples", "squeeze"],
)
def test_invalid_parameters_name_them(options, message):
    with pytest.raises(ValueError, match=message):
        RandCropByPosNegLabeld(KEYS, "label", (8, 8, 8), **options)


def test_spatial_size_zero_is_rejected():
    with pytest.raises(ValueError, match="spatial_size entries must be >= 1 or -1"):
        RandCropByPosNegLabeld(KEYS, "label", (8, 0, 8))
