"""The copy rule the caching datasets rely on: fedmed random transforms never mutate input.

CacheDataset hands the cached item to a rest made of fedmed transforms without copying it
(fedmed.data.prefix). This contract test runs every random transform fedmed exports, with
prob=1, many times on one cached item and checks the item afterwards: same tensors (values and
storage), same meta dicts (history not grown). A new random transform must be added here.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import fedmed.transforms as T
from fedmed.data import CacheDataset

KEYS = ("image", "label")

RANDOM_TRANSFORMS = {
    "RandCropByPosNegLabeld": lambda: T.RandCropByPosNegLabeld(
        KEYS, "label", (6, 6, 4), num_samples=3
    ),
    "RandElasticd": lambda: T.RandElasticd(KEYS, prob=1.0, magnitude=(1.0, 2.0), grid_size=3),
    "RandFlipd": lambda: T.RandFlipd(KEYS, prob=1.0),
    "RandGaussianNoised": lambda: T.RandGaussianNoised("image", prob=1.0, std=0.5),
    "RandRotate90d": lambda: T.RandRotate90d(KEYS, prob=1.0),
    "RandScaleIntensityd": lambda: T.RandScaleIntensityd("image", factors=0.5, prob=1.0),
    "RandShiftIntensityd": lambda: T.RandShiftIntensityd("image", offsets=0.5, prob=1.0),
}


def test_every_exported_random_transform_is_covered() -> None:
    exported = {
        name
        for name in T.__all__
        if inspect.isclass(getattr(T, name))
        and issubclass(getattr(T, name), T.RandomTransform)
        and getattr(T, name) is not T.RandomTransform
    }
    assert exported == set(RANDOM_TRANSFORMS)


def _snapshot(item: dict) -> dict:
    return {
        key: (value.clone(), value.data_ptr())
        if isinstance(value, torch.Tensor)
        else copy.deepcopy(value)
        for key, value in item.items()
    }


def _assert_same(value: object, expected: object, where: str) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(value, torch.Tensor) and torch.equal(value, expected), where
    elif isinstance(expected, dict):
        assert isinstance(value, dict) and value.keys() == expected.keys(), where
        for key in expected:
            _assert_same(value[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(value, type(expected)) and len(value) == len(expected), where
        for index, (a, b) in enumerate(zip(value, expected, strict=True)):
            _assert_same(a, b, f"{where}[{index}]")
    else:
        assert value == expected, where


@pytest.mark.parametrize("name", sorted(RANDOM_TRANSFORMS))
def test_random_transform_leaves_the_cached_item_unchanged(cases, name: str) -> None:
    # Prepare
    pipeline = T.Compose([T.LoadImaged(KEYS), RANDOM_TRANSFORMS[name]()]).set_random_state(0)
    dataset = CacheDataset(cases[:1], pipeline, progress=False)
    cached = dataset._cache[0]
    before = _snapshot(cached)

    # Execute
    outputs = [dataset[0] for _ in range(4)]

    # Assert
    assert outputs[0] is not cached
    for key, value in cached.items():
        if isinstance(value, torch.Tensor):
            original, pointer = before[key]
            assert value.data_ptr() == pointer and torch.equal(value, original), key
        else:
            _assert_same(value, before[key], key)


def test_steps_after_a_list_returning_step_run_on_every_sample(cases) -> None:
    pipeline = T.Compose(
        [
            T.LoadImaged(KEYS),
            T.RandCropByPosNegLabeld(KEYS, "label", (6, 6, 4), num_samples=3),
            T.RandShiftIntensityd("image", offsets=(5.0, 5.0), prob=1.0),
        ]
    ).set_random_state(0)
    prefix, rest = pipeline.split_deterministic()
    samples = rest(prefix(cases[0]))
    assert len(samples) == 3 and all(s["image"].shape == (1, 6, 6, 4) for s in samples)
    assert all(float(s["image"].min()) > -1000 for s in samples)
