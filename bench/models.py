"""Benchmark fedmed's networks on this machine; run by hand, ends with one JSON line.

    python bench/models.py                 # synthetic tensors
    python bench/models.py --data DIR      # crops of the first NIfTI volume found under DIR
    python bench/models.py --quick         # smaller sizes, for a smoke run

Measures:

1. training steps/s (SGD, forward + backward + step) of COPLE-Net on a 2D batch and of the
   3D U-Net baseline on a 96^3 patch, batch 1; on CUDA fp32 vs AMP (float16 + GradScaler);
2. LAMP U-Net: the partition the profiler chose over ``["cpu", "cpu"]`` (all CUDA devices when
   present), steps/s pipelined vs unpartitioned, and peak memory per stage vs the unpartitioned
   model, with and without skips. On CUDA the peak is ``torch.cuda.max_memory_allocated`` per
   device. On CPU (no allocator statistics) it is an *estimate* from per-cell profiles
   (``fedmed.nets.profile_cells``: bytes autograd saves for backward + outputs, per storage):
   unpartitioned = params and grads + all cells' activations for the whole batch; a stage
   without checkpointing = its params and grads + its activations for all micro-batches; with
   checkpointing = params and grads + its input state for all micro-batches + one
   micro-batch's activations (recomputed in backward);
3. the LAMP paper's inference claim on our code: one whole-volume forward vs 64^3 sliding-window
   inference over a 256x256x128 volume, as a time ratio (``fedmed.inference`` when present).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from fedmed.nets import COPLENet, LAMPUNet, UNet3D, profile_cells

__all__ = ["main"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load_volume(data: Path | None) -> torch.Tensor | None:
    """The first NIfTI image under ``data`` (not a label), as a z-scored float (X, Y, Z) tensor."""
    if data is None:
        return None
    from fedmed.io.nifti import read_nifti

    paths = sorted(
        p for p in data.rglob("*.nii*") if "label" not in str(p) and "_seg" not in p.name
    )
    if not paths:
        raise SystemExit(f"--data {data}: no NIfTI image found")
    array = torch.as_tensor(read_nifti(paths[0]).array, dtype=torch.float32)
    print(f"real data: {paths[0]} shape {tuple(array.shape)}")
    return (array - array.mean()) / array.std().clamp_min(1e-6)


def fit(volume: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor:
    """Centre crop / zero pad ``volume`` to ``shape``; random data when there is no volume."""
    if volume is None:
        return torch.randn(*shape)
    out = torch.zeros(*shape)
    src, dst = [], []
    for have, want in zip(volume.shape, shape, strict=True):
        n = min(have, want)
        a, b = (have - n) // 2, (want - n) // 2
        src.append(slice(a, a + n))
        dst.append(slice(b, b + n))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def steps_per_second(net: nn.Module, x: torch.Tensor, *, steps: int, amp: bool = False) -> float:
    """Training steps/s after two warm-up steps."""
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
    device = x.device
    scaler = torch.amp.GradScaler("cuda") if amp else None
    net.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = net(x).float().pow(2).mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    for _ in range(2):  # oneDNN / cuDNN pick kernels on the first calls of each shape
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps / (time.perf_counter() - start)


def bench_training(args: argparse.Namespace, volume: torch.Tensor | None, device: str) -> dict:
    out: dict[str, float] = {}
    b, s = args.cople_batch, args.cople_size
    slices = fit(volume, (s, s, b)).permute(2, 0, 1)[:, None] if volume is not None else None
    x2d = (slices if slices is not None else torch.randn(b, 1, s, s)).to(device)
    x3d = fit(volume, (args.patch,) * 3)[None, None].to(device)
    nets: dict[str, Callable[[], nn.Module]] = {
        "coplenet": lambda: COPLENet(in_channels=1, out_channels=2),
        "unet3d": lambda: UNet3D(in_channels=1, out_channels=2, features=args.unet_features),
    }
    for name, x in (("coplenet", x2d), ("unet3d", x3d)):
        torch.manual_seed(0)
        net = nets[name]().to(device)
        rate = steps_per_second(net, x, steps=args.steps)
        out[f"{name}_steps_per_s"] = rate
        print(f"{name:9s} input {tuple(x.shape)} fp32: {rate:.3f} steps/s")
        if device.startswith("cuda"):
            rate_amp = steps_per_second(net, x, steps=args.steps, amp=True)
            out[f"{name}_amp_steps_per_s"] = rate_amp
            print(f"{name:9s} input {tuple(x.shape)} AMP : {rate_amp:.3f} steps/s")
        del net
    return out


def _stage_inputs(net: LAMPUNet, x: torch.Tensor) -> list[int]:
    """Bytes of the state entering each stage for input ``x`` (one forward, no grad)."""
    sizes, state, sizes_in = net.placement.sizes, (x,), []
    boundaries = {sum(sizes[:j]) for j in range(len(sizes))}
    with torch.no_grad():
        for i, cell in enumerate(net.cells):
            if i in boundaries:
                sizes_in.append(sum(t.numel() * t.element_size() for t in state))
            state = cell(*(t.to(next(cell.parameters()).device) for t in state))
    return sizes_in


def estimate_cpu_memory(net: LAMPUNet, x: torch.Tensor) -> dict[str, object]:
    """Per-stage peak memory estimate (bytes) on CPU, see the module docstring."""
    chunks = min(net.chunks, x.shape[0])
    micro = x[: max(x.shape[0] // chunks, 1)]
    profiles = profile_cells(net.cells, micro, repeats=1)
    params = [2 * sum(p.numel() * p.element_size() for p in c.parameters()) for c in net.cells]
    acts = [p.memory_bytes - q for p, q in zip(profiles, params, strict=True)]
    whole = sum(params) + sum(acts) * chunks
    inputs = _stage_inputs(net, micro)
    stages = []
    for (start, stop), stage_in in zip(net.placement.bounds(), inputs, strict=True):
        p, a = sum(params[start:stop]), sum(acts[start:stop])
        stages.append(p + (chunks * stage_in + a if net.checkpoint else chunks * a))
    return {"unpartitioned_bytes": whole, "stage_bytes": stages}


def bench_lamp(args: argparse.Namespace, volume: torch.Tensor | None) -> dict:
    cuda = torch.cuda.device_count()
    if args.lamp_devices:
        devices = args.lamp_devices.split(",")
    else:
        devices = [f"cuda:{i}" for i in range(cuda)] if cuda else ["cpu", "cpu"]
    cuda = cuda and all(d.startswith("cuda") for d in devices)
    size, batch = args.lamp_size, args.lamp_batch
    x = torch.stack([fit(volume, (size,) * 3)[None] for _ in range(batch)])
    out: dict[str, object] = {"lamp_devices": devices}
    for skips in (True, False):
        tag = "skips" if skips else "parallel"
        options = {
            "features": args.lamp_features,
            "skip_connections": skips,
            "chunks": args.lamp_chunks,
            "checkpoint": True,
        }
        torch.manual_seed(0)
        start = time.perf_counter()
        net = LAMPUNet(
            **options, devices=devices, balance=args.balance, sample_shape=(1, 1, size, size, size)
        )
        profile_s = time.perf_counter() - start
        xin = x.to(devices[0])
        rate = steps_per_second(net, xin, steps=args.steps)
        if cuda:
            for d in devices:
                torch.cuda.reset_peak_memory_stats(d)
            steps_per_second(net, xin, steps=1)
            peaks = [torch.cuda.max_memory_allocated(d) for d in devices]
            single = LAMPUNet(**{**options, "chunks": 1, "checkpoint": False})
            single.load_state_dict(net.state_dict())
            single.to(devices[0])
            torch.cuda.reset_peak_memory_stats(devices[0])
            single_rate = steps_per_second(single, xin, steps=args.steps)
            memory = {"unpartitioned_bytes": torch.cuda.max_memory_allocated(devices[0])}
            memory["stage_bytes"] = peaks
        else:
            memory = estimate_cpu_memory(net, xin)
            single = LAMPUNet(**{**options, "chunks": 1, "checkpoint": False})
            single.load_state_dict(net.state_dict())
            single_rate = steps_per_second(single, xin, steps=args.steps)
        mib = [round(b / 2**20, 1) for b in memory["stage_bytes"]]
        whole_mib = round(memory["unpartitioned_bytes"] / 2**20, 1)
        print(
            f"lamp[{tag}] input {tuple(x.shape)} features {args.lamp_features}: stages "
            f"{net.placement.sizes} of {len(net.cells)} cells on {devices} "
            f"(balance={args.balance}, profiled in {profile_s:.1f} s)\n"
            f"  pipelined chunks={net.chunks} + checkpoint: {rate:.3f} steps/s, peak MiB per "
            f"stage {mib}; unpartitioned: {single_rate:.3f} steps/s, peak {whole_mib} MiB"
        )
        out[f"lamp_{tag}"] = {
            "stages": list(net.placement.sizes),
            "steps_per_s": rate,
            "unpartitioned_steps_per_s": single_rate,
            "stage_peak_mib": mib,
            "unpartitioned_peak_mib": whole_mib,
            "params": sum(p.numel() for p in net.parameters()),
        }
    return out


def _simple_sliding_window(
    x: torch.Tensor, roi: int, net: nn.Module, *, overlap: float
) -> torch.Tensor:
    """Fallback when fedmed.inference is absent: uniform-weight windows, last window shifted."""
    spatial = x.shape[2:]
    starts = []
    for size in spatial:
        step = max(int(roi * (1 - overlap)), 1)
        s = list(range(0, max(size - roi, 0) + 1, step))
        if s[-1] + roi < size:
            s.append(size - roi)
        starts.append(s)
    out, count = None, torch.zeros(1, 1, *spatial)
    for a in starts[0]:
        for b in starts[1]:
            for c in starts[2]:
                window = (..., slice(a, a + roi), slice(b, b + roi), slice(c, c + roi))
                y = net(x[window])
                if out is None:
                    out = torch.zeros(x.shape[0], y.shape[1], *spatial)
                out[window] += y
                count[window] += 1
    return out / count


def bench_inference(args: argparse.Namespace, volume: torch.Tensor | None, device: str) -> dict:
    try:
        from fedmed.inference import sliding_window_inference

        def window(x: torch.Tensor, net: nn.Module, overlap: float) -> torch.Tensor:
            return sliding_window_inference(
                x, args.roi, net, sw_batch_size=1, overlap=overlap, mode="constant"
            )

        source = "fedmed.inference.sliding_window_inference"
    except ImportError:

        def window(x: torch.Tensor, net: nn.Module, overlap: float) -> torch.Tensor:
            return _simple_sliding_window(x, args.roi, net, overlap=overlap)

        source = "bench fallback sliding window"
    x = fit(volume, args.volume)[None, None].to(device)
    net = UNet3D(features=args.infer_features).to(device).eval()
    timings: dict[str, float] = {}
    with torch.no_grad():
        net(x[..., : args.roi, : args.roi, : args.roi])  # warm-up
        for name, run in (
            ("whole", lambda: net(x)),
            *((f"window_overlap_{o}", lambda o=o: window(x, net, o)) for o in args.overlaps),
        ):
            sync()
            start = time.perf_counter()
            run()
            sync()
            timings[name] = time.perf_counter() - start
    print(
        f"inference UNet3D features {args.infer_features} on {tuple(x.shape)} ({source}, "
        f"{args.roi}^3 windows, batch 1): "
        + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
    )
    ratios = {
        f"inference_{k}_over_whole": v / timings["whole"]
        for k, v in timings.items()
        if k != "whole"
    }
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}x (LAMP paper, U-Net-32 on HaN GPU: 1.15 s / 0.6 s = 1.9x)")
    return {"inference_s": timings, **ratios}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder with NIfTI volumes (else synthetic)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after two warm-ups")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--balance", choices=("time", "memory"), default="memory")
    parser.add_argument("--only", choices=("train", "lamp", "infer"), action="append")
    parser.add_argument(
        "--lamp-devices",
        help="LAMP stage devices, e.g. cuda:0,cuda:0 on one GPU (default: every GPU, else cpu,cpu);"
        " a device named twice reports the same peak for both stages",
    )
    parser.add_argument("--cople-batch", type=int, help="COPLE-Net batch (default 4; 2 quick)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.cople_batch = args.cople_batch or (2 if quick else 4)
    args.cople_size = 64 if quick else 256
    args.patch = 32 if quick else 96
    args.unet_features = (8, 16, 32, 64, 80) if quick else (32, 64, 128, 256, 320)
    args.lamp_features = (4, 8, 16, 32, 64) if quick else (16, 32, 64, 128, 256)
    args.lamp_size, args.lamp_batch, args.lamp_chunks = (32, 2, 2) if quick else (64, 2, 2)
    args.infer_features = (4, 8, 16, 32, 64) if quick else (8, 16, 32, 64, 128)
    args.volume = (64, 64, 32) if quick else (256, 256, 128)
    args.roi = 32 if quick else 64
    args.overlaps = (0.0, 0.25)
    torch.set_num_threads(args.threads)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")
    volume = load_volume(args.data)
    figures: dict[str, object] = {"device": device, "threads": torch.get_num_threads()}
    parts = args.only or ["train", "lamp", "infer"]
    if "train" in parts:
        figures.update(bench_training(args, volume, device))
    if "lamp" in parts:
        figures.update(bench_lamp(args, volume))
    if "infer" in parts:
        figures.update(bench_inference(args, volume, device))
    print(json.dumps(figures, sort_keys=True, default=str))
    return figures


if __name__ == "__main__":
    main()
