"""SmartCacheDataset: the window, replacement per epoch, determinism, thread cleanup."""

from __future__ import annotations

import threading

import pytest

from fedmed.data import SmartCacheDataset


def _window_ids(dataset: SmartCacheDataset) -> list[str]:
    return [dataset[i]["id"] for i in range(len(dataset))]


def test_update_replaces_the_oldest_items_with_the_next_in_order(cases, tiny) -> None:
    # Prepare
    load = tiny.CountingLoad("image")
    dataset = SmartCacheDataset(cases, [load], cache_num=4, replace_rate=0.5, shuffle=False)
    assert _window_ids(dataset) == ["case00", "case01", "case02", "case03"]

    # Execute
    with dataset:
        dataset.update_cache()
        after_one = _window_ids(dataset)
        dataset.update_cache()
        after_two = _window_ids(dataset)

    # Assert
    assert after_one == ["case02", "case03", "case04", "case05"]
    assert after_two == ["case04", "case05", "case00", "case01"]
    # 4 initial + 2 per update; shutdown may cancel the batch prepared for a third update
    assert 8 <= load.calls <= 10


def test_windows_are_deterministic_given_the_seed(cases, tiny) -> None:
    def windows(seed: int) -> list[list[int]]:
        dataset = SmartCacheDataset(
            cases, [tiny.CountingLoad("image")], cache_num=3, replace_rate=0.3, seed=seed
        )
        out = [dataset.data_indices]
        with dataset:
            for _ in range(3):
                dataset.update_cache()
                out.append(dataset.data_indices)
        return out

    first, again, other = windows(7), windows(7), windows(8)
    assert first == again
    assert first != other
    assert all(len(w) == 3 for w in first)
    assert first[1][:2] == first[0][1:]  # one item replaced per epoch, oldest first


def test_update_without_start_builds_inline_and_matches_background(cases, tiny) -> None:
    inline = SmartCacheDataset(
        cases, [tiny.CountingLoad("image")], cache_num=2, replace_rate=0.5, seed=3
    )
    inline.update_cache()
    with SmartCacheDataset(
        cases, [tiny.CountingLoad("image")], cache_num=2, replace_rate=0.5, seed=3
    ) as bg:
        bg.update_cache()
        assert bg.data_indices == inline.data_indices
        assert _window_ids(bg) == _window_ids(inline)


def test_shutdown_stops_the_background_threads(cases, tiny) -> None:
    dataset = SmartCacheDataset(
        cases, [tiny.CountingLoad("image")], cache_num=2, replace_rate=0.5, num_replace_workers=2
    )
    dataset.start()
    assert any(t.name.startswith("fedmed-smartcache") for t in threading.enumerate())
    dataset.shutdown()
    assert not any(t.name.startswith("fedmed-smartcache") for t in threading.enumerate())


def test_window_larger_than_data_holds_every_item_and_never_replaces(cases, tiny) -> None:
    load = tiny.CountingLoad("image")
    with SmartCacheDataset(cases, [load], cache_num=50, replace_rate=0.5) as dataset:
        dataset.update_cache()
        assert len(dataset) == len(cases) and dataset.replace_num == 0
    assert load.calls == len(cases)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"cache_num": 0}, "cache_num"), ({"cache_num": 2, "replace_rate": 2.0}, "replace_rate")],
    ids=["cache_num", "replace_rate"],
)
def test_invalid_options_are_rejected(cases, tiny, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SmartCacheDataset(cases, [tiny.CountingLoad("image")], **kwargs)
