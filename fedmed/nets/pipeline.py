"""GPipe-style micro-batch pipelining of a sequence of cells over devices, in one process.

The route chosen (DESIGN.md section 6 names two): a single-process, multi-device schedule in
the style of torchgpipe rather than ``torch.distributed.pipelining``. It keeps one module tree
(so the state_dict is the single-device model's), needs no process group, and runs the same
on ``["cpu", "cpu"]`` in tests as on several GPUs.

The input batch is cut into ``chunks`` micro-batches; at clock tick ``t`` stage ``j`` runs
micro-batch ``t - j`` (the GPipe fill/drain schedule), each stage's state moved to the stage's
device with ``.to(device)``. The state carries the U-Net's skip stack, so a skip that spans
several stages is passed through the stages between (copied device to device). With
``checkpoint=True`` every (micro-batch, stage) is wrapped in ``torch.utils.checkpoint``
(``use_reentrant=False``): only stage inputs are kept, activations are recomputed in backward.

Concurrency: on CUDA the kernels are launched asynchronously, so the host enqueues stage 0's
next micro-batch while a later stage still runs, and autograd runs backward on one thread per
device. There are no worker threads or CUDA streams per stage as in torchgpipe; on CPU the
stages run one after another (the point there is the memory bound, and the tests).

Example:
    >>> cells = build_unet_cells(in_channels=1, out_channels=2, features=(8, 16))
    >>> y = run_pipeline(cells, (2, 3), torch.zeros(4, 1, 8, 8, 8), chunks=2)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as checkpoint_fn

__all__ = ["run_pipeline", "stage_device"]

State = tuple[torch.Tensor, ...]


def stage_device(cells: Sequence[nn.Module]) -> torch.device:
    """The device of a stage: where its first parameter lives (so ``model.to()`` just works)."""
    for cell in cells:
        for p in cell.parameters():
            return p.device
    raise ValueError("a pipeline stage has no parameters to tell its device")


class _Stage:
    def __init__(self, cells: Sequence[nn.Module]) -> None:
        self.cells = list(cells)

    def __call__(self, *state: torch.Tensor) -> State:
        for cell in self.cells:
            state = cell(*state)
        return state


def run_pipeline(
    cells: Sequence[nn.Module],
    sizes: Sequence[int],
    x: torch.Tensor,
    *,
    chunks: int = 1,
    checkpoint: bool = False,
) -> torch.Tensor:
    """Run ``cells`` split into stages of ``sizes`` over micro-batches of ``x``.

    Args:
        cells: cells mapping a state tuple ``(x, *skips)`` to a state tuple.
        sizes: cells per stage, in order; each stage runs where its parameters are.
        x: the batch, split along dim 0 into at most ``chunks`` micro-batches.
        chunks: number of micro-batches (fewer if the batch is smaller).
        checkpoint: recompute each stage's activations in backward (only while grad is on).

    Returns:
        The first tensor of the final state, micro-batches concatenated, on the last
        stage's device.
    """
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    if sum(sizes) != len(cells) or min(sizes, default=0) < 1:
        raise ValueError(f"stage sizes {tuple(sizes)} must be positive and sum to {len(cells)}")
    stages, start = [], 0
    for size in sizes:
        stages.append(_Stage(cells[start : start + size]))
        start += size
    devices = [stage_device(stage.cells) for stage in stages]
    use_checkpoint = checkpoint and torch.is_grad_enabled()

    states: list[State] = [(micro,) for micro in x.chunk(chunks)]
    n_micro, n_stages = len(states), len(stages)
    for clock in range(n_micro + n_stages - 1):
        for j in range(max(0, clock - n_micro + 1), min(clock + 1, n_stages)):
            i = clock - j
            state = tuple(t.to(devices[j]) for t in states[i])
            if use_checkpoint:
                states[i] = checkpoint_fn(stages[j], *state, use_reentrant=False)
            else:
                states[i] = stages[j](*state)
    return torch.cat([state[0] for state in states], dim=0)
