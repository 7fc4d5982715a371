"""The models, training and inference on a CUDA device agree with the CPU (skipped without one).

TF32 is switched off for these comparisons: with it, convolutions round inputs to 10-bit
mantissas and a CPU/GPU difference would say nothing about fedmed's code.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from fedmed.hardware import HardwareSettings
from fedmed.inference import sliding_window_inference
from fedmed.nets import COPLENet, LAMPUNet
from fedmed.predict import predict_volume
from fedmed.roundconfig import TrainConfig
from fedmed.train import LocalTrainer, TrainerConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FEATURES = (4, 8, 16)
SAMPLE = (1, 1, 16, 16, 16)


@pytest.fixture(autouse=True)
def exact_float32() -> Iterator[None]:
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize(
    "devices", [["cuda:0", "cuda:0"], ["cpu", "cuda:0"]], ids=["gpu-gpu", "cpu-gpu"]
)
@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpoint"])
def test_lamp_on_cuda_matches_the_unpartitioned_cpu_model(
    devices: list[str], checkpoint: bool
) -> None:
    # Prepare
    torch.manual_seed(0)
    reference = LAMPUNet(features=FEATURES, chunks=1, checkpoint=False)
    pipelined = LAMPUNet(
        features=FEATURES, devices=devices, chunks=2, checkpoint=checkpoint, sample_shape=SAMPLE
    )
    pipelined.load_state_dict(reference.state_dict())
    x = torch.randn(4, 1, 16, 16, 16)
    target = torch.randn(4, 2, 16, 16, 16)

    # Execute
    y_ref = reference(x)
    y_pipe = pipelined(x)
    (y_ref - target).pow(2).mean().backward()
    (y_pipe - target.to(y_pipe.device)).pow(2).mean().backward()

    # Assert
    assert y_pipe.device.type == "cuda"
    assert [d.type for d in pipelined.placement.devices] == [torch.device(d).type for d in devices]
    torch.testing.assert_close(y_pipe.cpu(), y_ref, atol=1e-4, rtol=1e-4)
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    for name, p in pipelined.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad.cpu(), ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_lamp_profiles_cuda_memory_per_cell() -> None:
    model = LAMPUNet(features=FEATURES, devices=["cuda:0", "cuda:0"], sample_shape=SAMPLE)

    costs = model.placement.stage_costs

    assert len(model.placement.sizes) == 2
    assert len(costs) == 2 and all(c > 0 for c in costs)


def test_coplenet_on_cuda_matches_cpu() -> None:
    torch.manual_seed(0)
    model = COPLENet(features=(8, 16, 32, 64, 128)).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        on_cpu = model(x)
        on_gpu = model.cuda()(x.cuda())
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=1e-4)


def _disc_batches(num: int, device: str) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    out = []
    for _ in range(num):
        centres = torch.randint(8, 24, (4, 2), generator=gen).float()
        dist = (yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2
        label = (dist < 36).long()[:, None]
        image = label.float() + 0.3 * torch.randn(label.shape, generator=gen)
        out.append({"image": image.to(device), "label": label.to(device)})
    return out


@pytest.mark.parametrize("amp", ["auto", "fp16", "bf16"])
def test_amp_training_on_cuda_learns_and_keeps_float32_weights(amp: str) -> None:
    # Prepare
    torch.manual_seed(0)
    model = COPLENet(features=(8, 16, 32, 64, 128))
    batches = _disc_batches(4, "cpu")
    hardware = HardwareSettings(devices="cuda", amp=amp, channels_last=amp == "bf16")
    trainer = LocalTrainer(model, config=TrainerConfig(steps=40, lr=3e-3), hardware=hardware)
    assert trainer.amp_dtype == (torch.bfloat16 if amp == "bf16" else torch.float16)

    def mean_loss() -> float:
        model.eval()
        with torch.no_grad():
            losses = [
                float(trainer.loss_fn(model(b["image"].cuda()), b["label"].cuda())) for b in batches
            ]
        return sum(losses) / len(losses)

    before = mean_loss()

    # Execute
    result = trainer.fit(batches, progress=False)

    # Assert
    after = mean_loss()
    assert math.isfinite(result.loss) and result.steps == 40
    assert after < 0.7 * before, (before, after)
    assert all(p.dtype == torch.float32 and p.is_cuda for p in model.parameters())


def test_sliding_window_on_cuda_matches_cpu() -> None:
    torch.manual_seed(0)
    model = LAMPUNet(features=FEATURES).eval()
    volume = torch.randn(1, 1, 40, 36, 24)
    with torch.no_grad():
        on_cpu = sliding_window_inference(volume, 16, model, overlap=0.25)
        model.cuda()
        on_gpu = sliding_window_inference(volume, 16, model, overlap=0.25, device="cuda")
    assert on_gpu.shape == on_cpu.shape == (1, 2, 40, 36, 24)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("devices", ["cpu,cuda:0", "cuda:0,cuda:0"])
def test_a_training_step_on_a_lamp_model_split_over_cpu_and_gpu_matches_the_cpu_step(
    devices: str,
) -> None:
    # Prepare
    torch.manual_seed(0)
    reference = LAMPUNet(features=FEATURES, chunks=1, checkpoint=False)
    split = LAMPUNet(features=FEATURES)
    split.load_state_dict(reference.state_dict())
    gen = torch.Generator().manual_seed(0)
    label = (torch.rand(4, 1, 16, 16, 16, generator=gen) > 0.7).long()
    batches = [{"image": label.float() + 0.3 * torch.randn(label.shape, generator=gen),
                "label": label}]  # fmt: skip
    config = TrainerConfig(steps=1, optimizer="sgd", lr=0.1, proximal_mu=0.1)
    hardware = HardwareSettings(devices=devices, amp="off", lamp_micro_batches=2)
    cpu = LocalTrainer(reference, config=config, device="cpu")
    gpu = LocalTrainer(split, config=config, hardware=hardware, sample_shape=SAMPLE)

    # Execute
    expected = cpu.fit(batches, progress=False)
    result = gpu.fit(batches, progress=False)

    # Assert
    assert gpu.output_device.type == "cuda"
    assert result.loss == pytest.approx(expected.loss, rel=1e-4)
    ref = dict(reference.named_parameters())
    for name, p in split.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), ref[name].grad, atol=1e-4, rtol=1e-3, msg=name)


def test_prediction_with_a_lamp_model_split_over_cpu_and_gpu_matches_the_cpu() -> None:
    torch.manual_seed(0)
    reference = LAMPUNet(features=FEATURES, chunks=1, checkpoint=False)
    split = LAMPUNet(features=FEATURES, devices=["cpu", "cuda:0"], balance=(3, 3), chunks=2)
    split.load_state_dict(reference.state_dict())
    cfg = TrainConfig(model="lamp_unet", model_features=FEATURES, patch_size=(16, 16, 16))
    image = torch.randn(1, 24, 20, 18)
    for whole in (False, True):
        expected = predict_volume(reference, image, cfg, whole_volume=whole)
        got = predict_volume(split, image, cfg, whole_volume=whole)
        assert (got.cpu() == expected).float().mean() > 0.999
