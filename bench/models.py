"""Benchmark fedmed's networks on this machine; run by hand, ends with one JSON line.

    python bench/models.py                 # synthetic tensors
    python bench/models.py --data DIR      # crops of the first NIfTI volume found under DIR
    python bench/models.py --quick         # smaller sizes, for a smoke run
    python bench/models.py --only settings --only infer   # the site hardware settings, LAMP

Run it with ``nice`` on a shared machine; compared variants run interleaved over ``--rounds``
rounds (the best round of each counts), so a burst of load from elsewhere slows them alike.

Measures:

0. (``settings``) the site hardware settings of :class:`fedmed.hardware.HardwareSettings`
   side by side with plain fp32, in the same run: COPLE-Net training steps/s (SGD, forward +
   backward + step, batch ``--cople-batch``) at 128^2 and 256^2 with bf16 autocast,
   channels-last, both, ``torch.compile``, and compile + bf16 (on CUDA also fp16 + scaler),
   each as a speedup over fp32;
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
3. the LAMP paper's inference claim on fedmed's inference code (``fedmed.predict``): a LAMP
   U-Net's whole-volume prediction (``predict_volume(..., whole_volume=True)``) vs 64^3
   sliding-window prediction with fedmed's defaults (25 % overlap, Gaussian blending, 4
   windows per batch) over a 256x256x128 volume, interleaved, as a time ratio (paper, U-Net-32
   on HaN on a GPU: 1.15 s / 0.6 s = 1.9x).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from fedmed.hardware import HardwareSettings
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


def steps_per_second(
    net: nn.Module, x: torch.Tensor, *, steps: int, hw: HardwareSettings | None = None
) -> float:
    """Training steps/s of ``net`` (placed already) under ``hw`` (default: fp32) after two
    warm-up steps, in which oneDNN / cuDNN pick kernels for the shape."""
    step = _train_step(net, hw or HardwareSettings(devices=x.device, amp="off"))
    for _ in range(2):
        step(x)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step(x)
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
            fp16 = HardwareSettings(devices=device, amp="fp16")
            rate_amp = steps_per_second(net, x, steps=args.steps, hw=fp16)
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


def bench_inference(args: argparse.Namespace, volume: torch.Tensor | None, device: str) -> dict:
    """LAMP whole-volume prediction vs fedmed's default sliding window, interleaved rounds."""
    from fedmed.predict import predict_volume
    from fedmed.roundconfig import TrainConfig

    cfg = TrainConfig(
        model="lamp_unet", model_features=args.infer_features, patch_size=(args.roi,) * 3
    )
    image = fit(volume, args.volume)[None].to(device)
    torch.manual_seed(0)
    net = LAMPUNet(features=args.infer_features, chunks=1, checkpoint=False).to(device).eval()
    runs = {
        "whole": lambda: predict_volume(net, image, cfg, whole_volume=True),
        "window": lambda: predict_volume(net, image, cfg),
    }
    with torch.no_grad():
        net(image[None, :, : args.roi, : args.roi, : args.roi])  # warm-up
    best = _race(runs, rounds=args.rounds)
    ratio = best["window"] / best["whole"]
    print(
        f"inference LAMPUNet features {args.infer_features} on {tuple(image.shape)} "
        f"(fedmed.predict.predict_volume, best of {args.rounds} interleaved rounds): whole volume "
        f"{best['whole']:.2f} s, {args.roi}^3 sliding window (overlap 0.25, gaussian, 4 windows "
        f"per batch) {best['window']:.2f} s: whole is {ratio:.2f}x faster "
        "(goal >= 2x; LAMP paper, U-Net-32 on HaN GPU: 1.15 s / 0.6 s = 1.9x)"
    )
    return {"inference_s": best, "inference_window_over_whole": ratio}


def _race(runs: dict[str, Callable[[], object]], *, rounds: int) -> dict[str, float]:
    """Best wall time of each run over ``rounds`` rounds, the runs interleaved in each."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _settings_variants(device: str) -> dict[str, HardwareSettings]:
    """Plain fp32 and each hardware setting (and the promising combinations) for ``device``."""
    dev = "cuda:0" if device == "cuda" else device
    variants = {
        "fp32": HardwareSettings(devices=dev, amp="off"),
        "bf16": HardwareSettings(devices=dev, amp="bf16"),
        "channels_last": HardwareSettings(devices=dev, amp="off", channels_last=True),
        "bf16+channels_last": HardwareSettings(devices=dev, amp="bf16", channels_last=True),
        "compile": HardwareSettings(devices=dev, amp="off", compile=True),
        "compile+bf16": HardwareSettings(devices=dev, amp="bf16", compile=True),
    }
    if dev.startswith("cuda"):
        variants["fp16"] = HardwareSettings(devices=dev, amp="fp16")
        variants["fp16+channels_last"] = HardwareSettings(
            devices=dev, amp="fp16", channels_last=True
        )
    return variants


def _train_step(net: nn.Module, hw: HardwareSettings) -> Callable[[torch.Tensor], None]:
    """One SGD step of ``net`` (placed by ``hw.prepare``) as ``LocalTrainer`` runs it under
    ``hw``: channels-last input, autocast, compiled forward, fp16 loss scaling."""
    forward = hw.compiled(net)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=hw.uses_grad_scaler)
    net.train()

    def step(x: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        with hw.autocast():
            out = forward(hw.format_input(x))
        loss = out.float().pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def bench_settings(args: argparse.Namespace, volume: torch.Tensor | None, device: str) -> dict:
    """COPLE-Net train steps/s per hardware setting vs plain fp32, interleaved rounds."""
    out: dict[str, object] = {}
    variants = _settings_variants(device)
    if args.skip_compile:
        variants = {k: v for k, v in variants.items() if not v.compile}
    b = args.cople_batch
    for size in args.settings_sizes:
        if any(hw.compile for hw in variants.values()):
            # fresh graphs per size: a recompile for a new shape would turn dynamic
            torch._dynamo.reset()
        x = fit(volume, (size, size, b)).permute(2, 0, 1)[:, None] if volume is not None else None
        x = (x if x is not None else torch.randn(b, 1, size, size)).to(device)
        steps: dict[str, Callable[[], None]] = {}
        warm: dict[str, float] = {}
        for name, hw in variants.items():
            torch.manual_seed(0)
            step = _train_step(hw.prepare(COPLENet(in_channels=1, out_channels=2)), hw)
            start = time.perf_counter()
            for _ in range(2):  # kernels picked, graphs compiled
                step(x)
            sync()
            warm[name] = time.perf_counter() - start
            steps[name] = lambda step=step, x=x: [step(x) for _ in range(args.steps)]
        best = _race(steps, rounds=args.rounds)
        rates = {name: args.steps / t for name, t in best.items()}
        speedups = {name: rate / rates["fp32"] for name, rate in rates.items()}
        top = max(speedups, key=speedups.__getitem__)
        print(
            f"coplenet train step, input {tuple(x.shape)} on {device}, best of {args.rounds} "
            f"interleaved rounds of {args.steps} steps:"
        )
        for name in rates:
            print(
                f"  {name:20s} {rates[name]:7.3f} steps/s  {speedups[name]:5.2f}x fp32"
                f"  (2 warm-up steps {warm[name]:.1f} s)"
            )
        print(f"  best: {top} {speedups[top]:.2f}x fp32 (goal >= 1.3x)")
        out[f"settings_coplenet_{size}"] = {
            "steps_per_s": rates,
            "speedup_vs_fp32": speedups,
            "warmup_s": warm,
            "best": top,
        }
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder with NIfTI volumes (else synthetic)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after two warm-ups")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--balance", choices=("time", "memory"), default="memory")
    parser.add_argument("--only", choices=("settings", "train", "lamp", "infer"), action="append")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best counts)")
    parser.add_argument("--skip-compile", action="store_true", help="no torch.compile variants")
    parser.add_argument(
        "--settings-sizes", type=int, nargs="+", help="COPLE-Net input sizes (128 256)"
    )
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
    args.settings_sizes = args.settings_sizes or ((64,) if quick else (128, 256))
    torch.set_num_threads(args.threads)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")
    volume = load_volume(args.data)
    figures: dict[str, object] = {"device": device, "threads": torch.get_num_threads()}
    parts = args.only or ["settings", "train", "lamp", "infer"]
    if "settings" in parts:
        figures.update(bench_settings(args, volume, device))
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
