"""run_pipeline: micro-batch splitting and argument checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmed.nets import build_unet_cells, run_pipeline
from fedmed.nets.pipeline import stage_device


@pytest.fixture(scope="module")
def cells() -> nn.ModuleList:
    torch.manual_seed(0)
    return build_unet_cells(in_channels=1, out_channels=2, features=(4, 8))


def _sequential(cells: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    state = (x,)
    for cell in cells:
        state = cell(*state)
    return state[0]


def test_more_chunks_than_samples_runs_one_sample_per_micro_batch(cells: nn.ModuleList) -> None:
    x = torch.randn(3, 1, 8, 8, 8)
    out = run_pipeline(cells, (2, 2), x, chunks=8)
    torch.testing.assert_close(out, _sequential(cells, x), atol=1e-5, rtol=1e-5)


def test_stages_run_micro_batches_in_gpipe_clock_order(cells: nn.ModuleList) -> None:
    # Prepare
    calls: list[int] = []
    hooks = [
        cell.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, cell in enumerate(cells)
    ]

    # Execute
    try:
        run_pipeline(cells, (1, 3), torch.randn(2, 1, 8, 8, 8), chunks=2)
    finally:
        for hook in hooks:
            hook.remove()

    # Assert: GPipe clock order. Tick 0: mb0 on stage 0 (cell 0); tick 1: mb1 on stage 0,
    # mb0 on stage 1 (cells 1-3); tick 2: mb1 on stage 1.
    assert calls == [0, 0, 1, 2, 3, 1, 2, 3]


@pytest.mark.parametrize(
    ("sizes", "chunks", "match"),
    [((2, 2), 0, "chunks must be >= 1"), ((2, 1), 1, "must be positive and sum to 4")],
    ids=["chunks", "sizes"],
)
def test_invalid_arguments_raise_value_error(
    cells: nn.ModuleList, sizes: tuple[int, ...], chunks: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        run_pipeline(cells, sizes, torch.randn(1, 1, 8, 8, 8), chunks=chunks)


def test_stage_without_parameters_has_no_device() -> None:
    with pytest.raises(ValueError, match="has no parameters"):
        stage_device([nn.ReLU()])
