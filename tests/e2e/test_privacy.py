"""Only weights and scalar metrics leave a site: every reply the sites sent in a real TLS run.

The sites of ``fault_harness.site_fault_run`` (shared with ``test_faults.py``) run fedmed's
production handlers behind ``fedmed_fault_app.record_mod``, a Flower client mod that writes each
outgoing message (records, values, arrays and the arrays' serialized bytes) to a folder. Sites
A and B are honest; C's corrupted replies still must not carry data, only its arrays are
deliberately malformed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fault_harness import FaultRun, site_fault_run
from safetensors.numpy import load_file

from fedmed.io.msd import load_site_dataset
from fedmed.io.nifti import read_nifti

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SITES = ("A", "B", "C")
HONEST = ("A", "B")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> FaultRun:
    return site_fault_run(tmp_path_factory.getbasetemp() / "site-faults")


@pytest.fixture(scope="module")
def global_shapes(run: FaultRun) -> dict[str, tuple[int, ...]]:
    weights = load_file(str(run.out / "checkpoints" / "round-0000" / "weights.safetensors"))
    return {k: tuple(v.shape) for k, v in weights.items()}


def _sent(run: FaultRun, site: str) -> Iterator[tuple[Path, dict, dict[str, np.ndarray], bytes]]:
    for folder in sorted((run.records / site).iterdir()):
        message = json.loads((folder / "message.json").read_text())
        with np.load(folder / "arrays.npz") as npz:
            arrays = {k: npz[k] for k in npz.files}
        yield folder, message, arrays, (folder / "raw.bin").read_bytes()


def _site_data(run: FaultRun, site: str) -> tuple[Path, list[str], list[np.ndarray]]:
    folder = run.data / f"site-{site}"
    dataset = load_site_dataset(folder)
    volumes = [
        read_nifti(case[kind]).array for case in dataset.cases for kind in ("image", "label")
    ]
    return folder, [case["case_id"] for case in dataset.cases], volumes


def test_every_sent_message_was_captured(run: FaultRun) -> None:
    for site in SITES:
        captured = list((run.records / site).iterdir())
        sent_lines = run.site_logs[site].count("Sending: ")
        assert len(captured) == sent_lines, site
    kinds = [m["message-type"] for _, m, _, _ in _sent(run, "A")]
    assert kinds.count("query") == 1 and kinds.count("train") >= 4


def test_train_replies_hold_exactly_the_model_arrays_and_scalar_metrics(
    run: FaultRun, global_shapes: dict[str, tuple[int, ...]]
) -> None:
    for site in HONEST:
        trains = [(m, a) for _, m, a, _ in _sent(run, site) if m["message-type"] == "train"]
        assert trains, site
        for message, arrays in trains:
            assert message["error"] is None
            records = message["records"]
            assert {k: r["type"] for k, r in records.items()} == {
                "arrays": "ArrayRecord",
                "arrays-index": "ConfigRecord",
                "metrics": "MetricRecord",
            }
            assert records["arrays"]["keys"] == ["packed"]  # fedmed.wire: one Flower array
            index = records["arrays-index"]["values"]
            assert set(index) == {"format", "keys", "dtypes", "ndims", "dims", "offsets", "nbytes"}
            assert set(index["keys"]) == set(global_shapes)
            shapes = {k.removeprefix("arrays/"): tuple(v.shape) for k, v in arrays.items()}
            assert shapes == global_shapes
            metrics = records["metrics"]["values"]
            assert "num-examples" in metrics and "train-loss" in metrics
            assert all(type(v) in (int, float) for v in metrics.values()), metrics  # no lists


def test_evaluate_replies_hold_disclosable_summaries_only(run: FaultRun) -> None:
    for site in HONEST:
        evaluations = [m for _, m, a, _ in _sent(run, site) if m["message-type"] == "evaluate"]
        assert len(evaluations) == 1, site  # the end-of-run evaluation
        (message,) = evaluations
        assert message["error"] is None
        records = message["records"]
        # share-models is off by default: no array leaves the site, only summaries
        assert {k: r["type"] for k, r in records.items()} == {
            "results": "ConfigRecord",
            "metrics": "MetricRecord",
        }
        entries = json.loads(records["results"]["values"]["entries"])
        assert entries, site
        for entry in entries:
            assert entry["n"] >= 5 or (entry["status"] == "too few cases" and "mean" not in entry)
            assert all(type(v) in (int, float, str) for v in entry.values()), entry


def test_query_replies_hold_the_site_name_and_case_counts_only(run: FaultRun) -> None:
    for site in SITES:
        queries = [m for _, m, a, _ in _sent(run, site) if m["message-type"] == "query"]
        assert queries, site
        for message in queries:
            assert message["error"] is None
            (record,) = message["records"].values()
            assert record["type"] == "ConfigRecord"
            values = record["values"]
            assert set(values) == {"name", "num-train-cases", "num-val-cases"}
            assert values["name"] == site
            assert isinstance(values["num-train-cases"], int)
            assert isinstance(values["num-val-cases"], int)


def test_no_array_is_an_image_label_or_patch(run: FaultRun) -> None:
    for site in SITES:
        _, _, volumes = _site_data(run, site)
        image_shapes = set()
        slices = []
        for volume in volumes:
            spatial = tuple(volume.shape[:3])
            image_shapes |= {spatial, (1, *spatial), spatial[:2], (1, *spatial[:2])}
            image_shapes |= {(1, 1, *spatial[:2]), (32, 32), (1, 32, 32)}  # the training patch
            for z in range(volume.shape[2]):
                plane = np.ascontiguousarray(volume[:, :, z], dtype=np.float32)
                if plane.min() != plane.max():  # constant planes say nothing about a patient
                    slices.append(plane.tobytes())
        for folder, _, arrays, raw in _sent(run, site):
            for key, array in arrays.items():
                assert tuple(array.shape) not in image_shapes, (folder, key, array.shape)
            assert not any(plane in raw for plane in slices), folder


def test_no_file_name_path_or_case_id_leaves_a_site(run: FaultRun) -> None:
    for site in SITES:
        folder, case_ids, _ = _site_data(run, site)
        needles = [
            str(folder),
            str(run.root),
            folder.name,
            ".nii",
            "imagesTr",
            "labelsTr",
            "dataset.json",
            *case_ids,
        ]
        for sent, message, arrays, raw in _sent(run, site):
            text = json.dumps(message) + " ".join(arrays)
            blob = raw + b"".join(a.tobytes() for a in arrays.values())
            for needle in needles:
                assert needle not in text, (sent, needle)
                assert needle.encode() not in blob, (sent, needle)
