"""A device list per simulated site (sim.toml ``[sites] devices``, ``--site-devices``),
checked against the GPUs Ray gives each site, and carried to the sites in the run config."""

from __future__ import annotations

import json

import pytest
from fedmed.simulation.apps import SIM_KEYS, RunConfigSites, SitePolicy, sim_run_config
from fedmed.simulation.cli import parse_config
from fedmed.simulation.config import load_sim_config
from fedmed.simulation.console import format_record
from flwr.app import Context, RecordDict

from fedmed.errors import ConfigError


def test_the_flag_and_the_config_file_give_each_site_its_devices(tmp_path):
    cfg, _ = parse_config(["--sites", "2", "--site-devices", "cpu,cpu", "cpu"])
    assert cfg.policy.devices == ("cpu,cpu", "cpu")
    path = tmp_path / "sim.toml"
    path.write_text('[sim]\nsites = 2\n[sites]\ndevices = ["cpu,cpu", ["cpu"]]\n')
    assert load_sim_config(path).policy.devices == ("cpu,cpu", "cpu")


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--site-devices", "cpu"], "lists 1 device lists for 3 sites"),
        (
            ["--sites", "1", "--site-devices", "cpu,cuda:0"],
            r"devices\[0\] \(site-A\) = 'cpu,cuda:0' names a CUDA device but resources "
            "num-gpus is 0",
        ),
        (
            ["--sites", "1", "--num-gpus", "1", "--site-devices", "cuda:0,cuda:1"],
            "'cuda:1' does not exist at a simulated site: Ray gives each site at most one GPU",
        ),
        (["--sites", "1", "--site-devices", "cpu,tpu"], "'tpu' is not a device"),
        (["--sites", "1", "--site-devices", "auto,cpu"], "'auto' stands alone"),
    ],
    ids=["count", "cuda-without-gpus", "second-gpu", "unknown", "auto-in-list"],
)
def test_device_lists_a_simulated_site_cannot_have_are_refused(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(argv)


def test_a_gpu_share_allows_cuda_and_cpu_stages():
    cfg, _ = parse_config(
        ["--sites", "2", "--num-gpus", "0.5", "--site-devices", "cpu,cuda", "cpu"]
    )
    assert cfg.policy.devices == ("cpu,cuda", "cpu")


def test_each_simulated_site_resolves_its_own_device_list():
    policy = SitePolicy(devices=("cpu,cpu", "cpu"))
    run_config = sim_run_config(
        ["/d/site-A", "/d/site-B"], cache_mode="none", device="cpu", threads=1, policy=policy
    )
    assert set(run_config) == set(SIM_KEYS)
    assert json.loads(str(run_config["sim-site-devices"])) == ["cpu,cpu", "cpu"]
    sites = [
        RunConfigSites()(
            Context(
                run_id=1,
                node_id=9,
                node_config={"partition-id": i, "num-partitions": 2},
                state=RecordDict(),
                run_config=run_config,
            )
        )
        for i in (0, 1)
    ]
    assert [s.device for s in sites] == ["cpu,cpu", "cpu"]


def test_round_line_shows_the_clean_label_dice_of_a_noisy_site():
    record = {
        "round": 1,
        "status": "ok",
        "holdout": {"dice": 0.5},
        "sites": {"site-C": {"val-dice": 0.25, "val-dice-clean": 0.625}},
    }
    assert format_record("fedavg", record) == (
        "[fedavg] round 1: held-out Dice 0.500 | site val Dice: site-C 0.250 (clean labels 0.625)"
    )
