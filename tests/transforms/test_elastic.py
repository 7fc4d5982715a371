from __future__ import annotations

import pytest
import torch

from fedmed.transforms import Elasticd, RandElasticd

KEYS = ("image", "label")


def test_elastic_keeps_label_values_in_the_label_set(item):
    out = RandElasticd(KEYS, prob=1.0, magnitude=(3.0, 4.0)).set_random_state(0)(item)

    assert out["label"].dtype == item["label"].dtype
    assert set(torch.unique(out["label"]).tolist()) <= {0, 1, 2}
    assert not torch.equal(out["label"], item["label"])
    assert out["image"].shape == item["image"].shape


def test_elastic_moves_image_and_label_together(item):
    out = Elasticd(KEYS, magnitude=3.0, seed=5)(item)
    lesion_before = item["image"][item["label"] == 1].mean()

    # the lesion is bright in the image; after the warp the label still marks bright voxels
    assert out["image"][out["label"] == 1].mean() > 0.95 * lesion_before


def test_elastic_with_zero_magnitude_is_identity(item):
    out = Elasticd(KEYS, magnitude=0.0, seed=1)(item)

    torch.testing.assert_close(out["image"], item["image"], atol=1e-5, rtol=0)
    assert torch.equal(out["label"], item["label"])


def test_elastic_is_reproducible_and_varies_across_seeds(item):
    def run(seed: int) -> torch.Tensor:
        return RandElasticd(KEYS, prob=1.0).set_random_state(seed)(item)["image"]

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_elastic_works_on_two_dimensional_slices():
    image = torch.rand(1, 24, 20)
    label = (image > 0.5).to(torch.uint8)

    out = Elasticd(KEYS, magnitude=2.0, seed=0, grid_size=4)({"image": image, "label": label})

    assert out["image"].shape == (1, 24, 20)
    assert set(torch.unique(out["label"]).tolist()) <= {0, 1}


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RandElasticd(KEYS, magnitude=(3.0, 1.0)), "magnitude must be"),
        (lambda: RandElasticd(KEYS, grid_size=1), "grid_size needs at least 2"),
        (lambda: Elasticd(KEYS, magnitude=-1.0, seed=0), "magnitude must be >= 0"),
    ],
    ids=["magnitude-order", "grid", "negative"],
)
def test_invalid_parameters_name_them(build, message):
    with pytest.raises(ValueError, match=message):
        build()
