from __future__ import annotations

import pytest
import torch

from fedmed.transforms import Compose, RandFlipd, RandRotate90d, invert

KEYS = ("image", "label")


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: RandFlipd(KEYS, prob=0.5), id="flip"),
        pytest.param(lambda: RandRotate90d(KEYS, prob=0.8, spatial_axes=(0, 2)), id="rot90"),
    ],
)
def test_random_spatial_is_reproducible_and_varies_across_seeds(item, build):
    def run(seed: int) -> list[torch.Tensor]:
        transform = build().set_random_state(seed)
        return [transform(item)["image"] for _ in range(6)]

    first, again, other = run(3), run(3), run(4)

    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, other, strict=True)
    )


def test_random_flip_records_the_twin_and_can_be_undone(item):
    out = RandFlipd(KEYS, prob=1.0, spatial_axis=(0, 1)).set_random_state(0)(item)

    assert out["image_meta"]["history"] == [{"name": "Flipd", "params": {"spatial_axis": [0, 1]}}]
    back = invert(out, "image")
    assert torch.equal(back["image"], item["image"])
    torch.testing.assert_close(back["image_meta"]["affine"], item["image_meta"]["affine"])


def test_random_flip_without_axis_flips_every_axis(item):
    out = RandFlipd(KEYS, prob=1.0)(item)

    assert torch.equal(out["label"], item["label"].flip(1, 2, 3))


def test_random_rotate_keeps_image_and_label_aligned(item):
    transform = RandRotate90d(KEYS, prob=1.0).set_random_state(1)
    for _ in range(4):
        out = transform(item)
        k = out["image_meta"]["history"][-1]["params"]["k"]
        assert 1 <= k <= 3
        assert torch.equal(out["label"], torch.rot90(item["label"], k, (1, 2)))
        assert torch.equal(out["image"], torch.rot90(item["image"], k, (1, 2)))


def test_rotate_rejects_bad_max_k():
    with pytest.raises(ValueError, match="max_k must be an integer >= 1"):
        RandRotate90d(KEYS, max_k=0)


def test_compose_seed_reproduces_a_pipeline(item):
    def pipeline() -> Compose:
        return Compose([RandFlipd(KEYS, prob=0.5), RandRotate90d(KEYS, prob=0.5)])

    first, second = pipeline().set_random_state(11), pipeline().set_random_state(11)
    for _ in range(5):
        a, b = first(item), second(item)
        assert torch.equal(a["image"], b["image"])
        assert a["image_meta"]["history"] == b["image_meta"]["history"]
