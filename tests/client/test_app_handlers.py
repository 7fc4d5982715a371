"""The ClientApp's query and train handlers, called the way a SuperNode calls the app."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fedmed.client.app import _task, make_client_app
from fedmed.client.runtime import PartitionSites, SiteRuntime, site_from_node_config
from flower_messages import flower_message
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedmed import wire
from fedmed.errors import ConfigError
from fedmed.globalmodel import build_network, local_norm_keys, model_arrays
from fedmed.io.msd import load_site_dataset, split_cases
from fedmed.io.nifti import read_nifti
from fedmed.roundconfig import TrainConfig
from fedmed.security.accountant import recompute_epsilon
from fedmed.security.dp import RELEASED_METRICS, DpParams
from fedmed.security.encryption import EncryptionKey

RUN = "ab" * 32  # the run's identity: its round-0 checkpoint's sha256
CFG = TrainConfig(
    model="coplenet",
    model_features=(4, 8, 16, 32, 64),
    patch_size=(32, 32),
    local_steps=1,
    batch_size=2,
    val_fraction=0.34,
    run_id=RUN,
)


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _train_content(arrays: dict[str, np.ndarray], cfg: TrainConfig) -> RecordDict:
    return RecordDict({**wire.pack(arrays), "config": ConfigRecord(cfg.to_config())})


def _strings(content: RecordDict) -> list[str]:
    """Strings in the content's ConfigRecords, except the packed arrays' index."""
    found = []
    for name, record in content.items():
        if isinstance(record, ConfigRecord) and name != wire.INDEX:
            found += [v for v in record.values() if isinstance(v, str)]
    return found


def test_query_answers_name_and_case_counts_only(demo_root):
    # Prepare
    app = make_client_app()
    ctx = _context({"site": "A", "data-dir": str(demo_root / "site-A")})
    msg = flower_message(RecordDict({"config": ConfigRecord(CFG.to_config())}), "query")
    # Execute
    reply = app(msg, ctx)
    # Assert
    assert not reply.has_error()
    train, val = split_cases(
        load_site_dataset(demo_root / "site-A").cases, val_fraction=CFG.val_fraction, seed=CFG.seed
    )
    assert dict(reply.content["site"]) == {
        "name": "A",
        "num-train-cases": len(train),
        "num-val-cases": len(val),
    }
    assert len(train) + len(val) == 3
    assert _strings(reply.content) == ["A"]


def test_missing_data_folder_replies_an_error_without_the_path(tmp_path):
    app = make_client_app()
    missing = tmp_path / "secret-hospital-folder"
    ctx = _context({"site": "A", "data-dir": str(missing)})
    reply = app(flower_message(RecordDict({"config": ConfigRecord(CFG.to_config())}), "query"), ctx)
    assert reply.has_error()
    assert reply.error.reason == "DataError at site A; details are in the site's log"
    assert "secret-hospital-folder" not in reply.error.reason


def test_node_config_without_data_dir_is_an_error_reply():
    reply = make_client_app()(flower_message(RecordDict(), "query"), _context({"site": "A"}))
    assert reply.has_error() and reply.error.reason.startswith("ConfigError at site node-7")


def test_partition_sites_maps_partition_to_folder(demo_root):
    resolve = PartitionSites((str(demo_root / "site-A"), str(demo_root / "site-B")))
    site = resolve(_context({"partition-id": 1, "num-partitions": 2}))
    assert site == SiteRuntime("site-B", str(demo_root / "site-B"), device="cpu")


def _disk_site(demo_root, cache, **extra) -> dict:
    data = str(demo_root / "site-A")
    return {"site": "A", "data-dir": data, "cache-dir": str(cache), "cache-mode": "disk", **extra}


def _voxel_chunks(demo_root) -> list[bytes]:
    """Pieces of site A's voxels as read from its files and as its pipeline caches them."""
    raw = read_nifti(load_site_dataset(demo_root / "site-A").cases[0]["image"]).array.tobytes()
    cached = _task(SiteRuntime("A", str(demo_root / "site-A"), device="cpu"), CFG)
    image = cached.train[0]["image"].numpy().tobytes()
    return [raw[:64], raw[1000:1064], image[:64], image[4096:4160]]


def test_a_disk_cache_without_a_key_is_refused_unless_the_site_accepts_plaintext(
    demo_root, tmp_path, monkeypatch, caplog
):
    # Prepare
    monkeypatch.delenv("FEDMED_CACHE_KEY", raising=False)
    ctx = _context(_disk_site(demo_root, tmp_path / "cache"))
    arrays = model_arrays(build_network(CFG, seed=0))
    # Execute: a train message, the way the SuperNode delivers it
    reply = make_client_app()(flower_message(_train_content(arrays, CFG), "train"), ctx)
    # Assert: refused before anything reached the disk, the reason only in the site's log
    assert reply.error.reason == "ConfigError at site node-7; details are in the site's log"
    assert "set FEDMED_CACHE_KEY" in caplog.text and "plaintext-cache = true" in caplog.text
    assert not (tmp_path / "cache").exists()
    with pytest.raises(
        ConfigError,
        match=r"site A node config: cache-mode = 'disk' would write the site's patient images "
        r"to disk unencrypted, and FEDMED_CACHE_KEY is not set: set FEDMED_CACHE_KEY .* or set "
        r"plaintext-cache = true in the site config to accept a plaintext cache",
    ):
        site_from_node_config(ctx)
    # a memory cache needs neither
    assert site_from_node_config(_context(_disk_site(demo_root, "", **{"cache-mode": "memory"})))


@pytest.mark.parametrize(
    ("mode", "match"),
    [
        ("disk-encrypted", r"cache-mode = 'disk-encrypted' is a retired spelling: write 'disk'"),
        ("ram", r"cache-mode = 'ram' must be one of memory, disk, none"),
    ],
    ids=["retired", "unknown"],
)
def test_the_node_configs_cache_mode_is_one_of_the_site_words(demo_root, tmp_path, mode, match):
    node = _disk_site(demo_root, tmp_path / "cache", **{"cache-mode": mode})
    with pytest.raises(ConfigError, match=rf"^site A node config: {match}"):
        site_from_node_config(_context(node))


def test_the_client_apps_public_api_is_pinned() -> None:
    import fedmed.client.app as module
    import fedmed.client.runtime as runtime

    assert sorted(module.__all__) == ["app", "make_client_app"]
    assert sorted(runtime.__all__) == [
        "PartitionSites",
        "SiteResolver",
        "SiteRuntime",
        "site_from_node_config",
    ]
    assert all(hasattr(module, name) for name in module.__all__)
    assert all(hasattr(runtime, name) for name in runtime.__all__)


def test_a_site_that_accepts_plaintext_caches_its_voxels_in_the_clear(
    demo_root, tmp_path, monkeypatch
):
    monkeypatch.delenv("FEDMED_CACHE_KEY", raising=False)
    node = _disk_site(demo_root, tmp_path / "cache", **{"plaintext-cache": True})
    site = site_from_node_config(_context(node))
    _task(site, CFG)
    blobs = [p.read_bytes() for p in (tmp_path / "cache" / "volumes").iterdir()]
    assert site.plaintext_cache and all(not b.startswith(b"FMENC") for b in blobs)
    # the voxel pieces the encrypted test looks for are there in a plaintext cache
    assert any(chunk in blob for chunk in _voxel_chunks(demo_root)[2:] for blob in blobs)


@pytest.mark.slow
def test_with_a_key_the_sites_disk_cache_holds_no_plaintext_voxels(
    demo_root, tmp_path, monkeypatch
):
    # Prepare
    monkeypatch.setenv("FEDMED_CACHE_KEY", EncryptionKey.generate().to_text())
    ctx = _context(_disk_site(demo_root, tmp_path / "cache"))
    arrays = model_arrays(build_network(CFG, seed=0))
    cfg = TrainConfig(**{**CFG.__dict__, "server_round": 1})
    # Execute: one round at the site
    reply = make_client_app()(flower_message(_train_content(arrays, cfg), "train"), ctx)
    # Assert
    assert not reply.has_error(), reply.error
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    entries = [p for p in files if p.parent.name == "volumes"]
    assert len(entries) == 3 and all(p.name.endswith(".safetensors.enc") for p in entries)
    chunks = _voxel_chunks(demo_root)
    for path in files:
        blob = path.read_bytes()
        assert not any(chunk in blob for chunk in chunks), path


@pytest.fixture(scope="module")
def fedbn_round(demo_root, tmp_path_factory):
    """One FedBN train message: the server left the norm statistics out of the arrays."""
    cache = tmp_path_factory.mktemp("cache")
    model = build_network(CFG, seed=0)
    norm = local_norm_keys(model)
    shared = {k: v for k, v in model_arrays(model).items() if k not in norm}
    cfg = TrainConfig(**{**CFG.__dict__, "fedbn": True, "server_round": 1})
    ctx = _context({"site": "A", "data-dir": str(demo_root / "site-A"), "cache-dir": str(cache)})
    reply = make_client_app()(flower_message(_train_content(shared, cfg), "train"), ctx)
    return reply, shared, norm, ctx, cache


@pytest.mark.slow
def test_train_reply_holds_exactly_arrays_and_metrics(fedbn_round, demo_root):
    reply, shared, _, _, _ = fedbn_round
    assert not reply.has_error(), reply.error
    assert set(reply.content) == {"arrays", "arrays-index", "metrics"}
    assert list(reply.content["arrays"]) == ["packed"]  # one Flower object for all arrays
    arrays = wire.unpack_content(reply.content)
    assert set(arrays) == set(shared)
    assert all(
        arrays[k].shape == shared[k].shape and arrays[k].dtype == shared[k].dtype for k in shared
    )
    metrics = dict(reply.content["metrics"])
    assert {"num-examples", "num-steps", "train-loss", "val-dice", "global-val-dice"} <= set(
        metrics
    )
    train, _ = split_cases(
        load_site_dataset(demo_root / "site-A").cases, val_fraction=CFG.val_fraction, seed=CFG.seed
    )
    assert metrics["num-examples"] == len(train)  # the aggregation weight: training cases
    assert _strings(reply.content) == []
    # the index names only the model's arrays and their dtypes
    index = reply.content["arrays-index"]
    assert index["keys"] == list(shared)
    assert set(index["dtypes"]) == {v.dtype.str for v in shared.values()}


@pytest.mark.slow
def test_fedbn_statistics_stay_at_the_site_under_the_runs_identity(fedbn_round):
    _, _, norm, ctx, cache = fedbn_round
    stored = ctx.state["site-state"]
    assert {k.removeprefix("norm/") for k in stored if k.startswith("norm/")} == set(norm)
    assert ctx.state["site-state-run"]["run-id"] == RUN
    assert (cache / "site-state" / f"{RUN[:16]}.safetensors").is_file()


def _evaluate(demo_root, node_config: dict, options: dict) -> Message:
    final = model_arrays(build_network(CFG, seed=1))
    content = RecordDict(
        {
            **wire.pack({f"global-final::{k}": v for k, v in final.items()}),
            "config": ConfigRecord(CFG.to_config()),
            "evaluation": ConfigRecord(options),
        }
    )
    ctx = _context({"site": "A", "data-dir": str(demo_root / "site-A"), **node_config})
    return make_client_app()(flower_message(content, "evaluate"), ctx)


@pytest.mark.slow
def test_evaluate_discloses_nothing_below_the_disclosure_floor(demo_root):
    # Execute: one validation case, the default floor of 5
    reply = _evaluate(demo_root, {}, {"own-models": False})
    # Assert: every entry withheld, no per-case value, no arrays back
    assert not reply.has_error(), reply.error
    entries = json.loads(reply.content["results"]["entries"])
    assert {(e["model"], e["data"]) for e in entries} == {("global-final", "val:A")}
    assert all(e["status"] == "too few cases" and "mean" not in e for e in entries)
    assert wire.ARRAYS not in reply.content
    assert set(reply.content["metrics"]) == {"global-final-val-dice", "global-final-val-n_cases"}


@pytest.mark.slow
@pytest.mark.parametrize("share", [False, True], ids=["models-stay", "models-travel"])
def test_evaluate_builds_the_sites_own_models(demo_root, share):
    options = {"own-models": True, "finetune-epochs": 1, "send-models": True}
    reply = _evaluate(demo_root, {"disclosure-floor": 1, "share-models": share}, options)
    assert not reply.has_error(), reply.error
    entries = json.loads(reply.content["results"]["entries"])
    by_model = {e["model"] for e in entries if e["status"] == "ok"}
    assert by_model == {"global-final", "finetuned@A"}
    dice = [e for e in entries if e["metric"] == "dice"]
    assert all(0.0 <= e["ci_low"] <= e["mean"] <= e["ci_high"] <= 1.0 for e in dice)
    # the site's own model leaves it only when its config allows
    assert (wire.ARRAYS in reply.content) == share
    if share:
        keys = wire.unpack_content(reply.content)
        assert all(k.startswith("finetuned@A::") for k in keys)


def _private(run: str, **dp) -> RecordDict:
    cfg = TrainConfig(**{**CFG.__dict__, "model_norm": "group", "run_id": run, "server_round": 1})
    arrays = model_arrays(build_network(cfg, seed=0))
    privacy = DpParams(mode="record", clip_norm=1.0, noise_multiplier=1.0, **dp).to_record()
    return RecordDict({**_train_content(arrays, cfg), "privacy": ConfigRecord(privacy)})


@pytest.mark.slow
def test_record_level_dp_reports_epsilon_and_nothing_else(demo_root, tmp_path):
    ctx = _context({"site": "A", "data-dir": str(demo_root / "site-A"), "cache-dir": str(tmp_path)})
    reply = make_client_app()(flower_message(_private("ef" * 32), "train"), ctx)
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content["metrics"])
    # only the public weight, the step count and the privacy record leave the site
    assert "val-dice" not in metrics and "train-loss" not in metrics
    assert set(metrics) <= set(RELEASED_METRICS)
    expected = recompute_epsilon({**metrics, "dp-mode": "record", "dp-adjacency": "add-remove"})
    assert metrics["dp-epsilon"] == pytest.approx(expected)
    assert (tmp_path / "privacy-ledger.json").is_file()


@pytest.mark.slow
def test_a_site_refuses_a_round_beyond_its_own_budget(demo_root, tmp_path):
    node = {
        "site": "A",
        "data-dir": str(demo_root / "site-A"),
        "cache-dir": str(tmp_path),
        "max-epsilon": 0.01,  # the site's own budget wins over the run's (none here)
    }
    reply = make_client_app()(flower_message(_private("ef" * 32), "train"), _context(node))
    assert reply.has_error()
    assert reply.error.reason.startswith("PrivacyBudgetExhausted at site A: privacy budget")
    assert "above its max-epsilon 0.01" in reply.error.reason
    assert not (tmp_path / "privacy-ledger.json").exists()  # nothing was spent


@pytest.mark.slow
def test_the_dp_noise_cannot_be_replayed_from_the_run_config(demo_root, tmp_path):
    # the coordinator knows the seed, the round and the global model: two sites (or one site
    # asked twice) with the same run config must still draw their own sampling and noise
    updates = []
    for folder in ("a", "b"):
        node = {
            "site": "A",
            "data-dir": str(demo_root / "site-A"),
            "cache-dir": str(tmp_path / folder),
        }
        torch.manual_seed(0)  # everything else the same: only the site's own entropy differs
        np.random.seed(0)
        reply = make_client_app()(flower_message(_private("ab" * 32), "train"), _context(node))
        assert not reply.has_error(), reply.error
        updates.append(wire.unpack_content(reply.content))
    first, second = updates
    assert first.keys() == second.keys()
    assert any(not np.array_equal(first[k], second[k]) for k in first)
