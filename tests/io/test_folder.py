"""The site folder's boundary: dataset.json read defensively, paths kept inside the folder."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from fedmed.errors import DataError
from fedmed.io.folder import MAX_DATASET_JSON_BYTES, MAX_JSON_DEPTH
from fedmed.io.msd import load_site_dataset
from fedmed.io.nifti import write_nifti

SHAPE = (6, 5, 4)


def _site(root: Path, **extra: object) -> Path:
    """A one-case MSD site with ``extra`` keys in its dataset.json."""
    write_nifti(root / "imagesTr" / "p01.nii.gz", np.zeros(SHAPE, np.float32), np.eye(4))
    write_nifti(root / "labelsTr" / "p01.nii.gz", np.zeros(SHAPE, np.uint8), np.eye(4))
    meta = {"training": [{"image": "./imagesTr/p01.nii.gz", "label": "./labelsTr/p01.nii.gz"}]}
    (root / "dataset.json").write_text(json.dumps({**meta, **extra}))
    return root


def _entry(image: str, label: str = "./labelsTr/p01.nii.gz") -> dict[str, list[dict[str, str]]]:
    return {"training": [{"image": image, "label": label}]}


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"test": 5}, r'"test" must be a list of image paths, got 5'),
        ({"test": {"a": 1}}, r'"test" must be a list of image paths'),
        ({"labels": {"0": ["background"]}}, r'"labels" keys must be integer label values'),
        ({"labels": {"0": "background", "300": "x"}}, r'"labels" value 300 is outside 0\.\.255'),
        ({"training": [{"image": "./a.nii", "label": "./b.nii", "case_id": 7}]}, "case_id"),
    ],
    ids=["test-int", "test-object", "label-name-list", "label-300", "case-id-int"],
)
def test_wrong_types_name_the_key(tmp_path: Path, extra, match) -> None:
    root = _site(tmp_path / "s", **extra)

    with pytest.raises(DataError, match=match) as info:
        load_site_dataset(root, require_files=False)

    assert str(root / "dataset.json") in str(info.value)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 100_000], ids=["over-limit", "100k"])
def test_deep_nesting_is_refused(tmp_path: Path, depth: int) -> None:
    root = _site(tmp_path / "s")
    meta = json.loads((root / "dataset.json").read_text())
    text = json.dumps(meta)[:-1] + ', "description": ' + "[" * depth + "]" * depth + "}"
    (root / "dataset.json").write_text(text)

    with pytest.raises(DataError, match=f"nested deeper than {MAX_JSON_DEPTH} levels"):
        load_site_dataset(root)


def test_oversized_dataset_json_is_refused(tmp_path: Path) -> None:
    root = _site(tmp_path / "s")
    meta = json.loads((root / "dataset.json").read_text())
    meta["description"] = "x" * MAX_DATASET_JSON_BYTES
    (root / "dataset.json").write_text(json.dumps(meta))

    with pytest.raises(DataError, match=r"dataset\.json: larger than 16 MiB"):
        load_site_dataset(root)


def test_dataset_json_pointing_at_dev_zero_is_refused(tmp_path: Path) -> None:
    root = _site(tmp_path / "s")
    (root / "dataset.json").unlink()
    (root / "dataset.json").symlink_to("/dev/zero")

    with pytest.raises(DataError, match=r"dataset\.json: a symbolic link to /dev/zero, outside"):
        load_site_dataset(root)
    with pytest.raises(DataError, match=r"dataset\.json: is a device or socket, not a regular"):
        load_site_dataset(root, allow_external_links=True)


def test_dataset_json_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    root = _site(tmp_path / "s")
    (root / "dataset.json").unlink()
    os.mkfifo(root / "dataset.json")
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            load_site_dataset(root)
        except BaseException as err:  # handed to the assertion below
            outcome.append(err)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():  # let the blocked reader go before failing
        os.close(os.open(root / "dataset.json", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO dataset.json blocked")
    assert isinstance(outcome[0], DataError)
    assert "dataset.json: is a FIFO, not a regular file" in str(outcome[0])


@pytest.mark.parametrize(
    ("image", "shown"),
    [
        ("../outside/p01.nii.gz", "../outside/p01.nii.gz"),
        ("./imagesTr/../../outside/p01.nii.gz", "./imagesTr/../../outside/p01.nii.gz"),
        ("/etc/hostname", "/etc/hostname"),
    ],
    ids=["dot-dot", "dot-dot-inside", "absolute"],
)
def test_paths_leaving_the_folder_are_refused(tmp_path: Path, image: str, shown: str) -> None:
    root = _site(tmp_path / "s")
    write_nifti(tmp_path / "outside" / "p01.nii.gz", np.zeros(SHAPE, np.float32), np.eye(4))
    (root / "dataset.json").write_text(json.dumps(_entry(image)))

    with pytest.raises(DataError) as info:
        load_site_dataset(root)

    assert str(info.value) == (
        f'{root / "dataset.json"}: "training" entry 0 image: {shown} points outside the site '
        f"folder {root}; list files inside it, relative to it (./imagesTr/x.nii.gz)"
    )


def test_absolute_path_inside_the_folder_is_accepted(tmp_path: Path) -> None:
    root = _site(tmp_path / "s")
    (root / "dataset.json").write_text(json.dumps(_entry(str(root / "imagesTr" / "p01.nii.gz"))))

    assert load_site_dataset(root).cases[0]["image"] == str(root / "imagesTr" / "p01.nii.gz")


def test_symlink_out_of_the_folder_needs_allow_external_links(tmp_path: Path) -> None:
    # Prepare: imagesTr is a link to a folder on another disk
    root = _site(tmp_path / "s")
    (root / "imagesTr").rename(tmp_path / "big-disk")
    (root / "imagesTr").symlink_to(tmp_path / "big-disk")

    # Execute / Assert
    with pytest.raises(DataError) as info:
        load_site_dataset(root)
    assert str(info.value).startswith(
        f"{root / 'imagesTr' / 'p01.nii.gz'}: a symbolic link to "
        f"{tmp_path / 'big-disk' / 'p01.nii.gz'}, outside the site folder {root}"
    )
    assert "set allow-external-links = true in the site config" in str(info.value)
    site = load_site_dataset(root, allow_external_links=True)
    assert site.cases[0]["image"] == str(root / "imagesTr" / "p01.nii.gz")


def test_symlink_inside_the_folder_is_fine(tmp_path: Path) -> None:
    root = _site(tmp_path / "s")
    (root / "imagesTr" / "p01.nii.gz").rename(root / "p01-original.nii.gz")
    (root / "imagesTr" / "p01.nii.gz").symlink_to(root / "p01-original.nii.gz")

    assert len(load_site_dataset(root).cases) == 1


def test_pairs_layout_refuses_links_out_of_the_folder(tmp_path: Path) -> None:
    write_nifti(tmp_path / "outside.nii.gz", np.zeros(SHAPE, np.float32), np.eye(4))
    root = tmp_path / "pairs"
    write_nifti(root / "a_seg.nii.gz", np.zeros(SHAPE, np.uint8), np.eye(4))
    (root / "a_img.nii.gz").symlink_to(tmp_path / "outside.nii.gz")

    with pytest.raises(DataError, match=r"a_img\.nii\.gz: a symbolic link to .*outside\.nii\.gz"):
        load_site_dataset(root)
    assert len(load_site_dataset(root, allow_external_links=True).cases) == 1
