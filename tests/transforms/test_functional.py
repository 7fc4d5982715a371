from __future__ import annotations

import itertools

import pytest
import torch

from fedmed.transforms.functional import (
    crop,
    exact_scale,
    fit_to_shape,
    flip,
    orient,
    pad,
    resample,
    rot90,
)
from fedmed.transforms.meta import record_step, spacing_of, translation


def _assert_index_map(before: torch.Tensor, after: torch.Tensor, index_map: torch.Tensor):
    """Every output voxel holds the input voxel that ``old = M @ new`` points to."""
    for new in itertools.product(*[range(s) for s in after.shape[1:]]):
        point = torch.tensor([*new, 1.0], dtype=torch.float64)
        old = (index_map @ point)[:-1].round().long().tolist()
        if all(0 <= o < s for o, s in zip(old, before.shape[1:], strict=True)):
            assert after[(0, *new)] == before[(0, *old)]


@pytest.fixture
def grid() -> torch.Tensor:
    return torch.arange(3 * 4 * 5, dtype=torch.float32).view(1, 3, 4, 5)


@pytest.mark.parametrize("k", [0, 1, 2, 3, -1])
@pytest.mark.parametrize("axes", [(0, 1), (1, 2), (0, 2), (2, 0)])
def test_rot90_matches_torch_and_its_index_map(grid, k, axes):
    out, index_map = rot90(grid, k, axes)

    assert torch.equal(out, torch.rot90(grid, k, [a + 1 for a in axes]))
    _assert_index_map(grid, out, index_map)


@pytest.mark.parametrize(
    "op",
    [
        pytest.param(lambda x: flip(x, [0, 2]), id="flip"),
        pytest.param(lambda x: crop(x, (1, 0, 2), (3, 3, 5)), id="crop"),
        pytest.param(lambda x: pad(x, (1, 0, 2), (0, 3, 1)), id="pad"),
        pytest.param(lambda x: orient(x, [2, 0, 1], [1]), id="orient"),
    ],
)
def test_index_maps_point_to_the_source_voxel(grid, op):
    out, index_map = op(grid)

    _assert_index_map(grid, out, index_map)


def test_crop_is_a_view_and_pad_keeps_dtype():
    label = torch.ones(1, 4, 4, 4, dtype=torch.uint8)

    view, _ = crop(label, (1, 1, 1), (3, 3, 3))
    padded, _ = pad(label, (1, 1, 1), (1, 1, 1))

    assert view.untyped_storage().data_ptr() == label.untyped_storage().data_ptr()
    assert padded.dtype == torch.uint8 and padded.shape == (1, 6, 6, 6)
    assert int(padded.sum()) == 64


def test_resample_of_a_label_uses_nearest_and_keeps_dtype():
    label = torch.randint(0, 3, (1, 6, 6, 4), dtype=torch.uint8)

    out, _ = resample(label, (2.0, 2.0, 2.0))

    assert out.dtype == torch.uint8 and out.shape == (1, 12, 12, 8)
    assert torch.equal(out[:, ::2, ::2, ::2], label)


def test_resample_index_map_gives_voxel_centres():
    ramp = torch.arange(10.0).view(1, 10, 1, 1).expand(1, 10, 2, 2).contiguous()

    out, index_map = resample(ramp, (0.7, 1.0, 1.0))

    positions = torch.arange(out.shape[1], dtype=torch.float64)
    expected = index_map[0, 0] * positions + index_map[0, 3]
    torch.testing.assert_close(out[0, :, 0, 0].double(), expected, atol=1e-5, rtol=0)


def test_exact_scale_absorbs_float32_header_rounding():
    scale = exact_scale(16, 0.69999998 / 1.4)

    assert int(16 * scale) == 8
    assert scale == pytest.approx(0.5, abs=1e-7)


def test_fit_to_shape_cuts_and_repeats_the_trailing_end():
    x = torch.arange(4.0).view(1, 4, 1, 1)

    assert fit_to_shape(x, (2, 1, 1)).flatten().tolist() == [0.0, 1.0]
    assert fit_to_shape(x, (6, 1, 1)).flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_record_step_returns_new_meta_and_leaves_the_old_one():
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64))
    meta = {"affine": affine, "spacing": spacing_of(affine), "history": []}

    new = record_step(meta, translation([1, 2, 3]), "SpatialCropd", {"start": [1, 2, 3]})

    assert meta["history"] == [] and torch.equal(meta["affine"], affine)
    assert new["affine"][:3, 3].tolist() == [2.0, 6.0, 12.0]
    assert new["history"] == [{"name": "SpatialCropd", "params": {"start": [1, 2, 3]}}]
