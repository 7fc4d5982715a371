"""Profile a sequence of cells and split it into contiguous stages, one per device.

``profile_cells`` runs every cell forward and backward once on a sample (after a warm-up) and
records its time and memory:

- time: wall-clock seconds of forward + backward (CUDA synchronised);
- memory on CUDA: ``torch.cuda.max_memory_allocated`` during the cell's forward + backward
  above what was allocated before it (so including its gradients), plus its parameters;
- memory on CPU (no allocator statistics): bytes of the tensors autograd saves for backward
  (counted once per storage, via ``torch.autograd.graph.saved_tensors_hooks``), of the cell's
  new outputs, and of its parameters and gradients.

``balance_costs`` then picks the contiguous split that minimises the largest stage cost
(exact dynamic programme; the slowest stage bounds a pipeline's throughput, the fullest device
bounds the input size).

Example:
    >>> cells = build_unet_cells(in_channels=1, out_channels=2, features=(8, 16))
    >>> part = partition_cells(cells, ["cpu", "cpu"], torch.zeros(1, 1, 16, 16, 16))
    >>> sum(part.sizes) == len(cells)
    True
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["CellProfile", "Partition", "balance_costs", "partition_cells", "profile_cells"]

Balance = Literal["time", "memory"]


@dataclass(frozen=True)
class CellProfile:
    """One cell's measured forward + backward time (seconds) and memory (bytes)."""

    time_s: float
    memory_bytes: int


@dataclass(frozen=True)
class Partition:
    """Contiguous stages: stage ``j`` holds ``sizes[j]`` cells and runs on ``devices[j]``."""

    sizes: tuple[int, ...]
    devices: tuple[torch.device, ...]
    balance: str
    stage_costs: tuple[float, ...] = ()

    def bounds(self) -> list[tuple[int, int]]:
        """``[(start, stop), ...]`` cell index ranges of the stages, in order."""
        out, start = [], 0
        for size in self.sizes:
            out.append((start, start + size))
            start += size
        return out


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def _tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _param_bytes(cell: nn.Module) -> int:
    # Parameters and their gradients.
    return 2 * sum(p.numel() * p.element_size() for p in cell.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_cell(cell: nn.Module, state: tuple[torch.Tensor, ...]) -> tuple[tuple, int]:
    """Forward + backward of one cell on detached copies of ``state``; returns (outputs, bytes)."""
    inputs = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in state)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = cell(*inputs)
    input_keys = {_storage_key(t) for t in inputs}
    new_outputs = [t for t in outputs if _storage_key(t) not in input_keys]
    grads = [t for t in outputs if t.requires_grad]
    torch.autograd.backward(grads, [torch.ones_like(t) for t in grads])
    cell.zero_grad(set_to_none=True)
    return tuple(t.detach() for t in outputs), _tensor_bytes(saved + new_outputs)


def profile_cells(
    cells: Sequence[nn.Module], sample: torch.Tensor, *, repeats: int = 2
) -> list[CellProfile]:
    """Time and memory of each cell, run in order on ``sample`` (each on its own device).

    Runs the whole sequence ``repeats`` times and keeps each cell's fastest time (the first
    pass also warms up kernels and allocators). Gradients are cleared and buffers (batch-norm
    running statistics) restored afterwards.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times = [float("inf")] * len(cells)
    memory = [0] * len(cells)
    # Profiling must not move batch-norm running statistics: restore every buffer after.
    buffers = [b.detach().clone() for cell in cells for b in cell.buffers()]
    for _ in range(repeats):
        state: tuple[torch.Tensor, ...] = (sample,)
        for i, cell in enumerate(cells):
            device = next(cell.parameters()).device
            state = tuple(t.to(device) for t in state)
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            state, cpu_bytes = _run_cell(cell, state)
            _sync(device)
            times[i] = min(times[i], time.perf_counter() - start)
            if device.type == "cuda":
                # The peak above ``before`` includes the gradients; add the parameters.
                peak = torch.cuda.max_memory_allocated(device) - before
                memory[i] = max(memory[i], peak + _param_bytes(cell) // 2)
            else:
                memory[i] = max(memory[i], cpu_bytes + _param_bytes(cell))
    with torch.no_grad():
        live = [b for cell in cells for b in cell.buffers()]
        for buffer, kept in zip(live, buffers, strict=True):
            buffer.copy_(kept)
    return [CellProfile(t, m) for t, m in zip(times, memory, strict=True)]


def balance_costs(costs: Sequence[float], stages: int) -> tuple[int, ...]:
    """Sizes of ``stages`` contiguous non-empty groups of ``costs`` minimising the largest sum.

    Example:
        >>> balance_costs([1, 1, 1, 3], 2)
        (3, 1)
    """
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} cells into {stages} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: smallest possible largest-stage cost for the first i cells in k stages.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    sizes, i = [], n
    for k in range(stages, 0, -1):
        sizes.append(i - cut[k][i])
        i = cut[k][i]
    return tuple(reversed(sizes))


def partition_cells(
    cells: Sequence[nn.Module],
    devices: Sequence[str | torch.device],
    sample: torch.Tensor,
    *,
    balance: Balance | Sequence[int] = "memory",
) -> Partition:
    """Split ``cells`` over ``devices`` and move each cell to its stage's device.

    ``balance`` is ``"time"`` (fastest slowest stage), ``"memory"`` (smallest fullest stage)
    or explicit stage sizes. Profiling runs with all cells on ``devices[0]``.
    """
    devs = tuple(torch.device(d) for d in devices)
    if not devs:
        raise ValueError("devices must name at least one device, e.g. ['cuda:0', 'cuda:1']")
    if len(devs) > len(cells):
        raise ValueError(f"devices: {len(devs)} devices for only {len(cells)} cells")
    stage_costs: tuple[float, ...] = ()
    if isinstance(balance, str):
        if balance not in ("time", "memory"):
            raise ValueError(f"balance must be 'time', 'memory' or stage sizes, got {balance!r}")
        sizes: tuple[int, ...] = (len(cells),)
        if len(devs) > 1:
            for cell in cells:
                cell.to(devs[0])
            profiles = profile_cells(cells, sample.to(devs[0]))
            costs = [p.time_s if balance == "time" else p.memory_bytes for p in profiles]
            sizes = balance_costs(costs, len(devs))
            stage_costs = tuple(float(sum(costs[start:stop])) for start, stop in _bounds(sizes))
    else:
        sizes = tuple(int(s) for s in balance)
        if len(sizes) != len(devs) or min(sizes) < 1 or sum(sizes) != len(cells):
            raise ValueError(
                f"balance sizes {sizes} must be {len(devs)} positive counts summing to "
                f"{len(cells)} cells"
            )
    part = Partition(sizes, devs, balance if isinstance(balance, str) else "explicit", stage_costs)
    for (start, stop), device in zip(part.bounds(), devs, strict=True):
        for cell in cells[start:stop]:
            cell.to(device)
    return part


def _bounds(sizes: Sequence[int]) -> list[tuple[int, int]]:
    return Partition(tuple(sizes), (), "").bounds()
