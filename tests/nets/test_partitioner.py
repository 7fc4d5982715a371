"""Profiling cells and balancing them into contiguous stages."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedmed.nets import balance_costs, build_unet_cells, partition_cells, profile_cells


def _brute_force(costs: list[float], stages: int) -> float:
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = (0, *cuts, len(costs))
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_balance_minimises_the_largest_stage_like_brute_force(stages: int) -> None:
    costs = [5.0, 1.0, 7.0, 2.0, 2.0, 9.0, 1.0, 3.0]
    sizes = balance_costs(costs, stages)
    assert len(sizes) == stages and min(sizes) >= 1 and sum(sizes) == len(costs)
    starts = list(itertools.accumulate((0, *sizes)))
    largest = max(sum(costs[a:b]) for a, b in itertools.pairwise(starts))
    assert largest == _brute_force(costs, stages)


def test_balance_puts_a_heavy_cell_alone() -> None:
    assert balance_costs([1, 1, 1, 3], 2) == (3, 1)
    assert balance_costs([10, 1, 1, 1], 2) == (1, 3)


def test_balance_rejects_more_stages_than_cells() -> None:
    with pytest.raises(ValueError, match="cannot split 2 cells into 3 non-empty stages"):
        balance_costs([1, 2], 3)


def test_profile_reports_time_and_memory_that_grows_with_input() -> None:
    cells = build_unet_cells(in_channels=1, out_channels=2, features=(4, 8))
    small = profile_cells(cells, torch.randn(1, 1, 8, 8, 8))
    large = profile_cells(cells, torch.randn(1, 1, 16, 16, 16))
    assert len(small) == len(cells)
    assert all(p.time_s > 0 for p in small)
    # The first encoder cell keeps conv/norm/act activations of 4 channels at full resolution.
    assert small[0].memory_bytes >= 4 * 8**3 * 4 * 3
    assert all(b.memory_bytes > a.memory_bytes for a, b in zip(small, large, strict=True))


@pytest.mark.parametrize("balance", ["time", "memory"])
def test_partition_covers_all_cells_in_order(balance: str) -> None:
    cells = build_unet_cells(in_channels=1, out_channels=2, features=(4, 8, 16))
    part = partition_cells(
        cells, ["cpu", "cpu", "cpu"], torch.randn(1, 1, 16, 16, 16), balance=balance
    )
    bounds = part.bounds()
    assert bounds[0][0] == 0 and bounds[-1][1] == len(cells)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert all(stop > start for start, stop in bounds)
    assert len(part.stage_costs) == 3 and part.balance == balance
