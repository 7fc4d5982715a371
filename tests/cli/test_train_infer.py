"""``fedmed train`` and ``fedmed infer``: learning, checkpoints, geometry, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fedmed.server.checkpoint import CheckpointStore
from safetensors import safe_open
from safetensors.numpy import save_file

from fedmed.checkpoint import load_checkpoint, save_checkpoint
from fedmed.cli import train as train_cli
from fedmed.cli.infer import input_images, load_model, predict_image
from fedmed.cli.main import build_parser, main
from fedmed.cli.train import checkpoint_metadata
from fedmed.errors import ConfigError, DataError, ModelError, SecurityError
from fedmed.globalmodel import build_network, model_arrays
from fedmed.io.nifti import read_nifti, read_nifti_header, write_nifti
from fedmed.pipeline import PipelineSettings
from fedmed.roundconfig import TrainConfig
from fedmed.security.chain import sign_checkpoint
from fedmed.security.pki import write_pki
from fedmed.security.signing import Signer

COPLE = TrainConfig(model="coplenet", model_features=(4, 8, 16, 32, 64), patch_size=(32, 32))
UNET = TrainConfig(model="unet3d", model_features=(4, 8), patch_size=(16, 16, 8))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
    """Three short epochs of COPLE-Net on site-A (48 slices, 6 steps an epoch)."""
    out = tmp_path_factory.mktemp("train")
    code = main(
        ["train", "--data", str(demo_root / "site-A"), "--val-data", str(demo_root / "holdout"),
         "--out", str(out), "--features", "4,8,16,32,64", "--patch-size", "32,32",
         "--batch-size", "8", "--epochs", "3", "--lr", "0.01", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    return out


@pytest.mark.slow
def test_training_lowers_the_loss_and_logs_each_epoch(trained):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["steps"] for r in records] == [6, 12, 18]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert all(0.0 <= r["val_dice"] <= 1.0 for r in records)


@pytest.mark.slow
def test_checkpoints_are_safetensors_with_the_model_in_their_metadata(trained):
    # Assert: no pickle anywhere, a safetensors header, metadata enough to rebuild the model
    assert sorted(p.name for p in trained.iterdir()) == [
        "best.json", "best.safetensors", "last.json", "last.safetensors", "metrics.jsonl",
    ]  # fmt: skip
    for name in ("best", "last"):
        path = trained / f"{name}.safetensors"
        with safe_open(str(path), framework="pt") as fh:
            assert "fedmed" in (fh.metadata() or {})
        state, meta = load_checkpoint(path)
        assert meta["format"] == "fedmed-model/1" and meta["model"] == "coplenet"
        assert TrainConfig.from_config(meta["task_config"]).model_features == (4, 8, 16, 32, 64)
        assert set(state) == set(build_network(COPLE).state_dict())
        assert json.loads((trained / f"{name}.json").read_text()) == meta
    best = json.loads((trained / "best.json").read_text())["val_dice"]
    dice = [json.loads(x)["val_dice"] for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert best == max(dice)


@pytest.fixture(scope="module")
def lps_image(tmp_path_factory) -> Path:
    """An LPS-oriented, anisotropic (0.7 x 0.9 x 2.5 mm) CT-like volume."""
    rng = np.random.default_rng(0)
    array = rng.normal(-600, 200, size=(30, 26, 7)).astype(np.float32)
    affine = np.array([[-0.7, 0, 0, 120.0], [0, -0.9, 0, 95.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])
    path = tmp_path_factory.mktemp("lps") / "scan_lps.nii.gz"
    write_nifti(path, array, affine)
    return path


@pytest.mark.parametrize("cfg", [COPLE, UNET], ids=["coplenet", "unet3d"])
def test_infer_writes_predictions_in_the_input_geometry(cfg, lps_image, tmp_path):
    # Prepare: a checkpoint that resamples to 1 x 1 x 2 mm before predicting
    settings = PipelineSettings(pixdim=(1.0, 1.0, 2.0))
    ckpt = save_checkpoint(
        tmp_path / "m.safetensors", build_network(cfg, seed=0), checkpoint_metadata(cfg, settings)
    )
    # Execute
    code = main(["infer", "--model", str(ckpt), "--input", str(lps_image),
                 "--output", str(tmp_path / "pred"), "--device", "cpu"])  # fmt: skip
    # Assert
    assert code == 0
    shape, affine = read_nifti_header(lps_image)
    pred_shape, pred_affine = read_nifti_header(tmp_path / "pred" / lps_image.name)
    assert pred_shape == shape == (30, 26, 7)
    np.testing.assert_allclose(pred_affine, affine, atol=1e-5)
    assert set(np.unique(read_nifti(tmp_path / "pred" / lps_image.name).array)) <= {0, 1}


@pytest.mark.parametrize("cfg", [COPLE, UNET], ids=["coplenet", "unet3d"])
def test_infer_accepts_a_federated_runs_round_checkpoint(cfg, tmp_path):
    # Prepare: the server's layout, runs/x/checkpoints/round-0002/weights.safetensors
    arrays = model_arrays(build_network(cfg, seed=3))
    round_dir = tmp_path / "run" / "checkpoints" / "round-0002"
    round_dir.mkdir(parents=True)
    save_file(arrays, str(round_dir / "weights.safetensors"))
    (tmp_path / "run" / "checkpoints" / "latest.json").write_text('{"round": 2, "hash": "x"}')
    # Execute
    loaded = load_model(tmp_path / "run", device="cpu", patch_size=(16, 16, 8))
    # Assert: the architecture was read off the weights
    assert loaded.cfg.model_features == cfg.model_features
    assert loaded.cfg.spatial_dims == cfg.spatial_dims
    state = loaded.model.state_dict()
    assert all(np.array_equal(state[k].numpy(), v) for k, v in arrays.items())


def test_input_images_skip_labels_and_search_msd_folders(demo_root, tmp_path):
    images = input_images(demo_root / "holdout")
    assert [p.parent.name for p in images] == ["imagesTr", "imagesTr"]
    write_nifti(tmp_path / "p1_seg.nii.gz", np.zeros((2, 2, 2), np.uint8), np.eye(4))
    with pytest.raises(DataError, match="holds no NIfTI image"):
        input_images(tmp_path)


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_train_errors_name_the_flag_or_file(demo_root, tmp_path):
    site = str(demo_root / "site-A")
    base = ["train", "--data", site, "--out", str(tmp_path / "o"), "--device", "cpu"]
    with pytest.raises(ConfigError, match="--patch-size 32,32,8 has 3 sizes but coplenet needs 2"):
        _run([*base, "--patch-size", "32,32,8"])
    config = tmp_path / "train.toml"
    config.write_text('[train]\nmodel = "unet3d"\nlearning-rate = 0.1\n')
    with pytest.raises(
        ConfigError, match=f"{config}: \\[train\\] has unknown key\\(s\\) learning-rate"
    ):
        _run([*base, "--config", str(config)])
    config.write_text("[train]\nepochs = 'two'\n")
    with pytest.raises(ConfigError, match=r"train.toml: \[train\] epochs = 'two' must be int"):
        _run([*base, "--config", str(config)])
    with pytest.raises(DataError, match="site data folder not found"):
        _run(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="--batch-size 0 must be >= 1"):
        _run([*base, "--batch-size", "0"])


def test_train_refuses_a_plaintext_disk_cache_unless_accepted(demo_root, tmp_path, monkeypatch):
    # Prepare
    monkeypatch.delenv("FEDMED_CACHE_KEY", raising=False)
    cache = tmp_path / "cache"
    base = ["train", "--data", str(demo_root / "site-A"), "--out", str(tmp_path / "o"),
            "--device", "cpu", "--cache-dir", str(cache)]  # fmt: skip
    # Execute / Assert
    with pytest.raises(
        ConfigError,
        match=rf"fedmed train --cache-dir {cache}: cache-mode = 'disk' would write .* "
        r"unencrypted.*set FEDMED_CACHE_KEY .* or pass --plaintext-cache \(or plaintext-cache "
        r"= true in \[train\]\) to accept a plaintext cache",
    ):
        _run(base)
    assert not cache.exists() and not (tmp_path / "o").exists()
    accepted = train_cli._options(build_parser().parse_args([*base, "--plaintext-cache"]))
    assert train_cli._build(accepted)[1].cache_mode == "disk"
    config = tmp_path / "train.toml"
    config.write_text('[train]\ncache-mode = "disk-encrypted"\n')
    with pytest.raises(ConfigError, match="cache-mode = 'disk-encrypted' is a retired spelling"):
        _run([*base, "--config", str(config)])


def test_infer_errors_name_the_checkpoint_or_input(tmp_path, lps_image):
    out = str(tmp_path / "pred")
    with pytest.raises(ModelError, match=r"--model .*missing does not exist"):
        _run(["infer", "--model", str(tmp_path / "missing"), "--input", str(lps_image),
              "--output", out])  # fmt: skip
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"bogus\.safetensors is not a readable safetensors"):
        _run(["infer", "--model", str(bogus), "--input", str(lps_image), "--output", out])
    ckpt = save_checkpoint(tmp_path / "m.safetensors", build_network(COPLE), {"round": 1})
    with pytest.raises(ModelError, match="has no task_config"):
        _run(["infer", "--model", str(ckpt), "--input", str(lps_image), "--output", out])
    good = save_checkpoint(
        tmp_path / "g.safetensors",
        build_network(COPLE),
        checkpoint_metadata(COPLE, PipelineSettings()),
    )
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(DataError, match=r"notes\.txt is not a NIfTI file"):
        _run(["infer", "--model", str(good), "--input", str(text), "--output", out])


def test_both_commands_are_registered(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    assert "train" in listing and "infer" in listing


def test_infer_opens_a_round_checkpoint_sealed_with_the_checkpoint_key(tmp_path, monkeypatch):
    # Prepare: a server that ran with FEDMED_CHECKPOINT_KEY sealed its weights file
    from fedmed.security.at_rest import write_arrays
    from fedmed.security.encryption import EncryptionKey

    key = EncryptionKey.generate()
    arrays = model_arrays(build_network(COPLE, seed=5))
    round_dir = tmp_path / "run" / "checkpoints" / "round-0001"
    round_dir.mkdir(parents=True)
    write_arrays(round_dir / "weights.safetensors", arrays, key=key)
    monkeypatch.delenv("FEDMED_CHECKPOINT_KEY", raising=False)
    with pytest.raises(SecurityError, match="is encrypted: set FEDMED_CHECKPOINT_KEY"):
        load_model(round_dir, device="cpu")
    monkeypatch.setenv("FEDMED_CHECKPOINT_KEY", key.to_text())

    # Execute
    loaded = load_model(round_dir, device="cpu")

    # Assert
    state = loaded.model.state_dict()
    assert all(np.array_equal(state[k].numpy(), v) for k, v in arrays.items())


# -- what infer loads: verified with --ca, bounded always ----------------------------------------
@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    write_pki(out, server_hosts=["localhost"], sites=[])
    return out


def _signed_run(root: Path, certs: Path, scores=(0.1, 0.6, 0.3)) -> Path:
    """A federated run's checkpoints as the server writes them, every round signed."""
    store, signer = CheckpointStore(root), Signer.from_dir(certs)
    for r, score in enumerate(scores):
        arrays = model_arrays(build_network(COPLE, seed=r))
        ckpt = store.save(r, arrays, metrics={}, config_hash="c", score=score)
        sign_checkpoint(ckpt.path, signer)
    return root


def test_infer_with_ca_loads_the_verified_best_round(tmp_path, certs):
    run = _signed_run(tmp_path / "run", certs)

    loaded = load_model(run, device="cpu", ca=certs / "ca.pem")

    best = model_arrays(build_network(COPLE, seed=1))  # round 1 has the best score
    state = loaded.model.state_dict()
    assert all(np.array_equal(state[k].numpy(), v) for k, v in best.items())


def test_infer_with_ca_refuses_an_unsigned_round_that_best_json_names(tmp_path, certs, lps_image):
    # Prepare: someone appends an unsigned round 3 with the top score: best.json follows it
    run = _signed_run(tmp_path / "run", certs)
    evil = model_arrays(build_network(COPLE, seed=9))
    CheckpointStore(run).save(3, evil, metrics={}, config_hash="c", score=0.99)
    argv = ["infer", "--model", str(run), "--input", str(lps_image),
            "--output", str(tmp_path / "pred"), "--device", "cpu"]  # fmt: skip

    # Execute + Assert
    with pytest.raises(SecurityError, match=r"round 3 .*signature\.json is missing"):
        _run([*argv, "--ca", str(certs / "ca.pem")])
    assert not (tmp_path / "pred").exists()


def test_infer_refuses_a_pointer_that_disagrees_with_the_checkpoint(tmp_path, certs):
    run = _signed_run(tmp_path / "run", certs)
    best = run / "checkpoints" / "best.json"
    best.write_text(json.dumps({"round": 1, "hash": "0" * 64, "score": 0.6}))

    with pytest.raises(SecurityError, match=r"best\.json names round 1 with sha256 000000000000"):
        load_model(run, device="cpu", ca=certs / "ca.pem")
    with pytest.raises(SecurityError, match=r"best\.json names round 1"):  # without --ca too
        load_model(run, device="cpu")


def test_infer_with_ca_refuses_an_unsigned_train_checkpoint(tmp_path, certs):
    ckpt = save_checkpoint(
        tmp_path / "m.safetensors",
        build_network(COPLE),
        checkpoint_metadata(COPLE, PipelineSettings()),
    )
    with pytest.raises(SecurityError, match="fedmed train checkpoint, which carries no signature"):
        load_model(ckpt, device="cpu", ca=certs / "ca.pem")


@pytest.mark.parametrize(
    ("task", "pipeline", "match"),
    [
        ({"model-features": "65536,131072,262144,524288,1048576"}, {}, "outside 1..1024"),
        ({"model-features": "4,8,16,32,64"}, {"pixdim": [0.001, 0.001, 0.001]}, "pixdim"),
        ({"patch-size": "100000,100000"}, {}, r"patch-size \(100000, 100000\) is outside"),
        ({"model-features": "1024,1024,1024,1024,1024", "patch-size": "1024,1024"}, {},
         "more than the memory cap"),
    ],
    ids=["features", "pixdim", "patch", "memory"],
)  # fmt: skip
def test_crafted_metadata_is_refused_before_building_anything(tmp_path, task, pipeline, match):
    # Prepare: a small real network, metadata asking for far more
    meta = checkpoint_metadata(COPLE, PipelineSettings())
    meta["task_config"].update(task)
    if "pixdim" in pipeline:
        meta["plan"]["target_spacing"] = pipeline["pixdim"]
    ckpt = save_checkpoint(tmp_path / "crafted.safetensors", build_network(COPLE), meta)

    # Execute + Assert
    with pytest.raises(ModelError, match=match):
        load_model(ckpt, device="cpu")


def test_an_image_too_large_after_resampling_is_refused(tmp_path, lps_image):
    # Prepare: a legal but fine pixdim (0.1 mm) on a 30 x 26 x 7 volume: ~8.6 M voxels
    ckpt = save_checkpoint(
        tmp_path / "m.safetensors",
        build_network(COPLE),
        checkpoint_metadata(COPLE, PipelineSettings(pixdim=(0.1, 0.1, 0.1))),
    )
    argv = ["infer", "--model", str(ckpt), "--input", str(lps_image),
            "--output", str(tmp_path / "pred"), "--device", "cpu",
            "--max-memory", "0.05"]  # fmt: skip

    # Execute + Assert
    with pytest.raises(ModelError, match=r"scan_lps\.nii\.gz: .* more than the memory cap"):
        _run(argv)


def test_weights_of_no_fedmed_network_are_refused(tmp_path):
    round_dir = tmp_path / "round-0000"
    round_dir.mkdir()
    save_file(
        {"cells.x.block.0.weight": np.zeros((2, 2), np.float32)},
        str(round_dir / "weights.safetensors"),
    )

    with pytest.raises(ModelError, match="the weights are not a fedmed network"):
        load_model(round_dir, device="cpu")


def test_infer_with_ca_refuses_best_json_moved_to_another_signed_round(tmp_path, certs):
    # Prepare: best.json names round 0 (the untrained model), with round 0's true hash
    run = _signed_run(tmp_path / "run", certs)
    zero = json.loads((run / "checkpoints" / "round-0000" / "meta.json").read_text())
    best = run / "checkpoints" / "best.json"
    best.write_text(json.dumps({"round": 0, "hash": zero["weights_sha256"], "score": 0.1}))

    # Execute + Assert
    with pytest.raises(SecurityError, match="the best scored round of the verified chain is 1"):
        load_model(run, device="cpu", ca=certs / "ca.pem")
    loaded = load_model(run / "checkpoints" / "round-0000", device="cpu", ca=certs / "ca.pem")
    assert loaded.cfg.model_features == COPLE.model_features  # a round chosen on purpose loads


def test_train_never_trains_on_a_nan_image_or_a_misplaced_label(demo_root, tmp_path, caplog):
    # the probe: `fedmed train` trained on an image with NaN and a label 50 mm off, exit 0
    site = Path(shutil.copytree(demo_root / "site-A", tmp_path / "site-A"))
    image = site / "imagesTr" / "site-A_patient_000.nii.gz"
    volume = read_nifti(image)
    array = volume.array.astype(np.float32)
    array[1, 2, 3] = np.nan
    write_nifti(image, array, volume.affine)
    label = site / "labelsTr" / "site-A_patient_001.nii.gz"
    volume = read_nifti(label)
    write_nifti(label, volume.array, volume.affine + _shift(50.0))
    base = ["train", "--data", str(site), "--out", str(tmp_path / "o"), "--device", "cpu",
            "--features", "4,8,16,32,64", "--patch-size", "16,16", "--epochs", "1"]  # fmt: skip

    with pytest.raises(DataError, match=r"only 1 usable case\(s\)"):
        _run(base)

    assert f"{image}: 1 voxels are NaN or infinite" in caplog.text
    assert f"{label}: affine differs from its image" in caplog.text
    assert not (tmp_path / "o" / "last.safetensors").exists()
    config = tmp_path / "train.toml"
    config.write_text('[train]\non-bad-case = "stop"\n')
    with pytest.raises(
        DataError, match='1 of 3 cases failed the data check and on-bad-case is "stop"'
    ):
        _run([*base, "--config", str(config)])


def _shift(mm: float) -> np.ndarray:
    offset = np.zeros((4, 4))
    offset[2, 3] = mm
    return offset


# --- the preprocessing plan: infer resamples to the training spacing and back ---------------

LPS_SPACING = (0.57, 0.57, 5.0)
TRAINING_SPACING = (1.14, 1.14, 5.0)


@pytest.fixture(scope="module")
def lps_ct(tmp_path_factory) -> Path:
    """A CT-like 96x96x12 volume of 0.57 x 0.57 x 5 mm voxels in LPS (x and y flipped)."""
    rng = np.random.default_rng(1)
    array = rng.normal(-700, 150, size=(96, 96, 12)).astype(np.int16)
    array[30:60, 40:70, 3:9] = 40  # a soft-tissue block
    sx, sy, sz = LPS_SPACING
    affine = np.array([[-sx, 0, 0, 150.3], [0, -sy, 0, 120.7], [0, 0, sz, -310.0], [0, 0, 0, 1]])
    path = tmp_path_factory.mktemp("lps-ct") / "ct_lps.nii.gz"
    write_nifti(path, array, affine)
    return path


@pytest.mark.parametrize("cfg", [COPLE, UNET], ids=["coplenet", "unet3d"])
def test_infer_predicts_at_the_training_spacing_and_restores_shape_and_affine(
    cfg, lps_ct, tmp_path
):
    # Prepare: a model trained at 1.14 x 1.14 x 5 mm
    settings = PipelineSettings(pixdim=TRAINING_SPACING)
    ckpt = save_checkpoint(
        tmp_path / "m.safetensors", build_network(cfg, seed=0), checkpoint_metadata(cfg, settings)
    )
    loaded = load_model(ckpt, device="cpu")

    # Execute
    label_map, meta = predict_image(loaded, lps_ct)
    code = main(["infer", "--model", str(ckpt), "--input", str(lps_ct),
                 "--output", str(tmp_path / "pred"), "--device", "cpu"])  # fmt: skip

    # Assert: predicted on the 48x48x12 RAS grid of the training spacing ...
    assert loaded.settings.pixdim == TRAINING_SPACING
    assert tuple(label_map.shape) == (48, 48, 12)
    np.testing.assert_allclose(meta["spacing"], TRAINING_SPACING, rtol=1e-6)
    # ... and written on the input's grid, shape and affine exactly
    assert code == 0
    shape, affine = read_nifti_header(lps_ct)
    pred_shape, pred_affine = read_nifti_header(tmp_path / "pred" / lps_ct.name)
    assert pred_shape == shape == (96, 96, 12)
    np.testing.assert_array_equal(pred_affine, affine)


def test_checkpoints_record_the_preprocessing_plan(tmp_path):
    settings = PipelineSettings(pixdim=TRAINING_SPACING, hu_window=(-1200.0, 300.0))
    meta = checkpoint_metadata(UNET, settings)
    assert meta["plan"] == {
        "version": 1,
        "orientation": "RAS",
        "target_spacing": list(TRAINING_SPACING),
        "intensity": {"kind": "ct-window", "low": -1200.0, "high": 300.0},
        "patch_size": [16, 16, 8],
        "model": "unet3d",
        "model_options": {"in_channels": 1, "out_channels": 2, "features": [4, 8]},
    }
    assert "pipeline" not in meta


def test_infer_still_reads_checkpoints_written_before_plans(tmp_path):
    old = {
        "format": "fedmed-model/1",
        "model": "unet3d",
        "task_config": UNET.to_config(),
        "pipeline": {"hu_window": [-1100.0, 350.0], "pixdim": [1.0, 1.0, 2.0]},
    }
    ckpt = save_checkpoint(tmp_path / "old.safetensors", build_network(UNET), old)
    loaded = load_model(ckpt, device="cpu")
    assert loaded.settings.pixdim == (1.0, 1.0, 2.0)
    assert loaded.settings.hu_window == (-1100.0, 350.0)


def test_infer_takes_the_plan_of_a_round_checkpoints_meta_json(tmp_path):
    # Prepare: a round checkpoint whose meta.json records the plan (the server writes it)
    store = CheckpointStore(tmp_path / "run")
    plan = checkpoint_metadata(UNET, PipelineSettings(pixdim=(2.0, 2.0, 3.0)))["plan"]
    weights = model_arrays(build_network(UNET, seed=1))
    store.save(0, weights, metrics={}, config_hash="h", plan=plan)
    checkpoint = store.save(1, weights, metrics={}, config_hash="h", plan=plan)
    # Execute
    loaded = load_model(checkpoint.path, device="cpu")
    # Assert
    assert loaded.settings.pixdim == (2.0, 2.0, 3.0)
    assert loaded.cfg.patch_size == (16, 16, 8)


def test_infer_refuses_a_plan_of_an_unknown_version(tmp_path):
    meta = checkpoint_metadata(COPLE, PipelineSettings())
    meta["plan"]["version"] = 99
    ckpt = save_checkpoint(tmp_path / "future.safetensors", build_network(COPLE), meta)
    with pytest.raises(ModelError, match=r"future\.safetensors: preprocessing plan version 99"):
        load_model(ckpt, device="cpu")


def test_train_and_infer_refuse_a_device_list_for_coplenet(lps_image, tmp_path, demo_root):
    ckpt = save_checkpoint(
        tmp_path / "m.safetensors",
        build_network(COPLE),
        checkpoint_metadata(COPLE, PipelineSettings()),
    )
    with pytest.raises(ConfigError, match="device lists 2 devices but COPLENet cannot be split"):
        _run(["infer", "--model", str(ckpt), "--input", str(lps_image),
              "--output", str(tmp_path / "p"), "--device", "cpu,cpu"])  # fmt: skip
    with pytest.raises(ConfigError, match="fedmed train: device = 'cpu,cuda:99'"):
        _run(["train", "--data", str(demo_root / "site-A"), "--out", str(tmp_path / "o"),
              "--device", "cpu,cuda:99"])  # fmt: skip


def test_train_splits_lamp_over_a_device_list(demo_root, tmp_path):
    # Execute: LAMP over two CPU "devices", bf16 from the [train] table
    config = tmp_path / "train.toml"
    config.write_text('[train]\namp = "bf16"\nlamp-micro-batches = 2\nlamp-balance = "time"\n')
    code = main(
        ["train", "--data", str(demo_root / "site-A"), "--out", str(tmp_path / "o"),
         "--model", "lamp_unet", "--features", "4,8", "--patch-size", "16,16,8",
         "--epochs", "1", "--device", "cpu,cpu", "--config", str(config)]
    )  # fmt: skip
    # Assert: the weights are the single-device model's, the plan names the model
    assert code == 0
    state, meta = load_checkpoint(tmp_path / "o" / "last.safetensors")
    lamp = TrainConfig(model="lamp_unet", model_features=(4, 8), patch_size=(16, 16, 8))
    assert sorted(state) == sorted(build_network(lamp).state_dict())
    assert meta["plan"]["model"] == "lamp_unet" and meta["plan"]["patch_size"] == [16, 16, 8]


def test_train_takes_the_loss_and_intensity_settings(demo_root, tmp_path):
    # Execute: noise-robust Dice with the paper's denominator and self-ensembling, MR z-score
    code = main(
        ["train", "--data", str(demo_root / "site-A"), "--out", str(tmp_path / "o"),
         "--features", "4,8,16,32,64", "--patch-size", "32,32", "--steps", "2",
         "--loss", "nr-dice", "--nr-gamma", "2", "--nr-denominator", "squared",
         "--self-ensembling", "--intensity", "zscore-nonzero", "--device", "cpu"]
    )  # fmt: skip
    # Assert: the checkpoint records both
    assert code == 0
    _, meta = load_checkpoint(tmp_path / "o" / "last.safetensors")
    assert meta["training"] == {
        "loss": "nr-dice", "nr-gamma": 2.0, "nr-denominator": "squared", "self-ensembling": True,
    }  # fmt: skip
    assert meta["plan"]["intensity"] == {"kind": "zscore", "nonzero": True}
    with pytest.raises(ConfigError, match="does not combine with self_ensembling"):
        _run(["train", "--data", str(demo_root / "site-A"), "--out", str(tmp_path / "x"),
              "--model", "unet3d", "--self-ensembling", "--device", "cpu"])  # fmt: skip
