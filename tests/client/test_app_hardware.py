"""The client app's site hardware (device lists, AMP, LAMP options) and the round's plan."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from fedmed.client.app import _task, make_client_app
from fedmed.client.runtime import PartitionSites, SiteRuntime, site_from_node_config
from flower_messages import flower_message
from flwr.app import ConfigRecord, Context, RecordDict

from fedmed import wire
from fedmed.errors import ConfigError
from fedmed.globalmodel import build_network, model_arrays
from fedmed.hardware import HardwareSettings
from fedmed.roundconfig import TrainConfig
from fedmed.security.dp import DpParams

LAMP = TrainConfig(
    model="lamp_unet",
    model_features=(4, 8, 16),
    patch_size=(16, 16, 16),
    local_steps=1,
    batch_size=2,
    val_fraction=0.34,
    run_id="cd" * 32,
    server_round=1,
)


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_node_config_hardware_keys_make_the_sites_hardware_settings(demo_root):
    node = {
        "site": "A",
        "data-dir": str(demo_root / "site-A"),
        "device": "cpu,cpu",
        "amp": "bf16",
        "channels-last": True,
        "lamp-micro-batches": 2,
        "lamp-checkpointing": False,
        "lamp-balance": "time",
    }
    site = site_from_node_config(_context(node))
    assert site.hardware == HardwareSettings(
        devices="cpu,cpu",
        amp="bf16",
        channels_last=True,
        lamp_micro_batches=2,
        lamp_checkpointing=False,
        lamp_balance="time",
    )
    assert site.device == "cpu,cpu"


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("amp", "fp8", "site A node config: amp = 'fp8' is unknown"),
        ("device", "cpu,tpu", "site A node config: device = 'cpu,tpu': 'tpu' is not a device"),
        ("lamp-micro-batches", "0", "lamp-micro-batches = 0 must be an integer >= 1"),
    ],
    ids=["amp", "device", "micro-batches"],
)
def test_bad_hardware_keys_name_the_key(demo_root, key, value, match):
    node = {"site": "A", "data-dir": str(demo_root / "site-A"), key: value}
    with pytest.raises(ConfigError, match=match):
        site_from_node_config(_context(node))


def test_a_cuda_device_this_machine_lacks_is_refused(demo_root):
    missing = f"cuda:{torch.cuda.device_count()}"
    node = {"site": "A", "data-dir": str(demo_root / "site-A"), "device": missing}
    with pytest.raises(ConfigError, match=f"device = '{missing}': '{missing}' does not exist"):
        site_from_node_config(_context(node))


def test_simulated_sites_get_their_own_device_lists(demo_root):
    folders = (str(demo_root / "site-A"), str(demo_root / "site-B"))
    resolve = PartitionSites(folders, devices=("cpu,cpu", "cpu"))
    first = resolve(_context({"partition-id": 0, "num-partitions": 2}))
    second = resolve(_context({"partition-id": 1, "num-partitions": 2}))
    assert [len(s.hardware.devices) for s in (first, second)] == [2, 1]
    assert second == SiteRuntime("site-B", folders[1], device="cpu")
    with pytest.raises(ConfigError, match="site devices: 1 device lists for 2 sites"):
        PartitionSites(folders, devices=("cpu",))
    missing = f"cuda:{torch.cuda.device_count()}"
    bad = PartitionSites(folders, devices=("cpu", missing))
    with pytest.raises(ConfigError, match=f"simulated site site-B: device = '{missing}'"):
        bad(_context({"partition-id": 1, "num-partitions": 2}))


def test_the_site_pipeline_follows_the_rounds_plan_and_keeps_the_case_guard(demo_root):
    site = SiteRuntime("A", str(demo_root / "site-A"), device="cpu")
    site = dataclasses.replace(
        site, guard=dataclasses.replace(site.guard, on_bad_case="stop", max_image_bytes=1 << 28)
    )
    native = _task(site, LAMP)
    coarse_cfg = dataclasses.replace(LAMP, target_spacing=(12.0, 12.0, 20.0), intensity="zscore")
    coarse = _task(site, coarse_cfg)
    assert coarse is not native  # another plan: another pipeline, another cache
    assert (coarse.settings.pixdim, coarse.settings.intensity) == ((12.0, 12.0, 20.0), "zscore")
    assert coarse.settings.guard.on_bad_case == "stop"
    assert coarse.settings.guard.max_image_bytes == 1 << 28
    assert coarse.settings.guard.num_classes == LAMP.out_channels
    assert coarse.train[0]["image"].numel() < native.train[0]["image"].numel()
    assert _task(site, coarse_cfg) is coarse


def test_record_level_dp_with_a_split_lamp_model_is_refused(demo_root, tmp_path, caplog):
    # Prepare: a round with record-level DP for a site that splits LAMP over two devices
    arrays = model_arrays(build_network(LAMP, seed=0))
    privacy = DpParams(mode="record", clip_norm=1.0, noise_multiplier=1.0).to_record()
    content = RecordDict(
        {
            **wire.pack(arrays),
            "config": ConfigRecord(LAMP.to_config()),
            "privacy": ConfigRecord(privacy),
        }
    )
    node = {
        "site": "A",
        "data-dir": str(demo_root / "site-A"),
        "cache-dir": str(tmp_path),
        "device": "cpu,cpu",
    }
    # Execute
    with caplog.at_level(logging.ERROR, logger="fedmed.client.app"):
        reply = make_client_app()(flower_message(content, "train"), _context(node))
    # Assert: refused before anything was trained or spent
    assert reply.has_error() and reply.error.reason.startswith("ConfigError at site A")
    assert "whose per-patient gradients need the whole model on one device" in caplog.text
    assert not (tmp_path / "privacy-ledger.json").exists()


@pytest.mark.slow
def test_a_lamp_round_on_a_device_list_replies_the_models_arrays(demo_root):
    arrays = model_arrays(build_network(LAMP, seed=0))
    content = RecordDict({**wire.pack(arrays), "config": ConfigRecord(LAMP.to_config())})
    node = {"site": "A", "data-dir": str(demo_root / "site-A"), "device": "cpu,cpu"}
    reply = make_client_app()(flower_message(content, "train"), _context(node))
    assert not reply.has_error(), reply.error
    sent = wire.unpack_content(reply.content)
    assert set(sent) == set(arrays)
    assert all(sent[k].shape == arrays[k].shape for k in arrays)
    assert 0.0 <= dict(reply.content["metrics"])["val-dice"] <= 1.0
