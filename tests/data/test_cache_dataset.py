"""CacheDataset: prefix runs once, random rest per access, copy rule, memory bound."""

from __future__ import annotations

import pytest
import torch

from fedmed.data import CacheDataset
from fedmed.errors import DataError
from fedmed.transforms.base import Compose


def test_prefix_runs_once_per_item_and_rest_on_every_access(cases, tiny) -> None:
    # Prepare
    load = tiny.CountingLoad(("image", "label"))
    pipeline = Compose([load, tiny.Scale("image", factor=2.0), tiny.RandAddNoise("image")])

    # Execute
    dataset = CacheDataset(cases, pipeline, num_workers=2, progress=False)
    first = [dataset[i]["image"] for i in range(len(dataset))]
    second = [dataset[i]["image"] for i in range(len(dataset))]

    # Assert
    assert load.calls == len(cases)
    assert len(dataset) == dataset.cached_count == len(cases)
    assert all(not torch.equal(a, b) for a, b in zip(first, second, strict=True))
    # the noise is one constant per access, on top of the same cached values
    assert all(float((a - b).std()) < 1e-3 for a, b in zip(first, second, strict=True))


def test_results_keep_data_order_with_parallel_build(cases, tiny) -> None:
    dataset = CacheDataset(cases, [tiny.CountingLoad("image")], num_workers=3, progress=False)
    assert [dataset[i]["image_meta"]["filename"] for i in range(len(cases))] == [
        c["image"] for c in cases
    ]


def test_cache_rate_caches_a_prefix_of_the_items(cases, tiny) -> None:
    load = tiny.CountingLoad("image")
    dataset = CacheDataset(cases, [load], cache_rate=0.5, progress=False)
    assert dataset.cached_count == 3 and load.calls == 3
    dataset[5]
    dataset[5]
    assert load.calls == 5


def test_fedmed_rest_gets_the_cached_tensors_without_copy(cases, tiny) -> None:
    dataset = CacheDataset(cases[:1], [tiny.CountingLoad("image")], progress=False)
    a, b = dataset[0], dataset[0]
    assert a is not b
    assert a["image"].data_ptr() == b["image"].data_ptr()


def test_unknown_callable_in_rest_gets_a_deep_copy_so_cache_stays_intact(cases, tiny) -> None:
    # Prepare
    dataset = CacheDataset(
        cases[:1], [tiny.CountingLoad("image"), tiny.mutate_in_place], progress=False
    )

    # Execute
    first = dataset[0]
    second = dataset[0]

    # Assert: each access saw the pristine cached item
    assert torch.equal(first["image"], second["image"])
    assert second["image_meta"]["history"] == ["mutated"]


def test_list_returning_rest_gives_a_list_of_samples(cases, tiny) -> None:
    dataset = CacheDataset(
        cases[:2],
        [tiny.CountingLoad("image"), tiny.RandSamples("image", num_samples=3)],
        progress=False,
    )
    samples = dataset[1]
    assert isinstance(samples, list) and [s["sample"] for s in samples] == [0, 1, 2]
    assert samples[0]["image"].shape == (1, tiny.SHAPE[0] // 2, *tiny.SHAPE[1:])


def test_memory_bound_is_checked_before_building_everything(cases, tiny) -> None:
    load = tiny.CountingLoad("image")
    item_bytes = 4 * tiny.SHAPE[0] * tiny.SHAPE[1] * tiny.SHAPE[2] + 16 * 8
    with pytest.raises(
        DataError,
        match=r"caching 6 items needs about .* GiB .*first item .* MiB x 6.*max_memory_bytes "
        r"limit .* lower cache_rate to 0\.[0-9]+ or less, or use PersistentDataset",
    ):
        CacheDataset(cases, [load], max_memory_bytes=3 * item_bytes, num_workers=2, progress=False)
    assert load.calls == 2  # only the items the two workers started first


def test_memory_bound_uses_available_ram_by_default(cases, tiny) -> None:
    dataset = CacheDataset(cases, [tiny.CountingLoad("image")], progress=False)
    assert dataset.cache_nbytes > 0


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"cache_rate": 1.5}, "cache_rate"), ({"num_workers": 0}, "num_workers")]
)
def test_invalid_options_are_rejected(cases, tiny, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        CacheDataset(cases, [tiny.CountingLoad("image")], progress=False, **kwargs)
