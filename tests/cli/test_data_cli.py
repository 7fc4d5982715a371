"""``fedmed demo-data`` and ``fedmed data check``: output lines and exit codes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmed.cli.main import main
from fedmed.errors import DataError
from fedmed.io.nifti import write_nifti

BIN = Path(sys.executable).parent


def test_demo_data_writes_sites_and_reports_progress_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data"

    code = main(
        ["demo-data", str(out), "--sites", "2", "--cases", "2", "--seed", "1",
         "--shape", "16", "16", "8", "--holdout", "1"]
    )  # fmt: skip

    captured = capsys.readouterr()
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["holdout", "site-A", "site-B"]
    assert captured.err.splitlines() == [
        "site-A: case 1/2",
        "site-A: case 2/2",
        "site-B: case 1/2",
        "site-B: case 2/2",
        "holdout: case 1/1",
    ]
    lines = captured.out.splitlines()
    assert lines[0].startswith(f"wrote {out / 'site-A'} (2 cases; scanner A:")
    assert lines[-1] == f"wrote {out / 'holdout'} (1 cases; held-out set)"


def test_demo_data_rejects_a_bad_count_with_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo-data", str(tmp_path), "--cases", "0"])

    assert info.value.code == 2
    assert "--cases: must be >= 1, got 0" in capsys.readouterr().err


def test_data_check_on_clean_sites_exits_zero_with_summary(
    demo_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["data", "check", str(demo_root / "site-A"), str(demo_root / "site-C")])

    assert code == 0
    assert capsys.readouterr().out.splitlines() == [
        "site-A: 3 cases, 0 problems",
        "site-C: 3 cases, 0 problems",
    ]


def test_data_check_prints_each_problem_and_exits_with_data_error_code(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a copy of site-B with a shape mismatch and a label without image
    site = Path(shutil.copytree(demo_root / "site-B", tmp_path / "site-B"))
    label = site / "labelsTr" / "site-B_patient_000.nii.gz"
    write_nifti(label, np.zeros((32, 32, 15), np.uint8), np.eye(4))
    orphan = site / "labelsTr" / "extra.nii.gz"
    write_nifti(orphan, np.zeros((32, 32, 16), np.uint8), np.eye(4))

    # Execute
    code = main(["data", "check", "--no-progress", str(site)])

    # Assert
    lines = capsys.readouterr().out.splitlines()
    assert code == DataError.exit_code == 4
    assert len(lines) == 3
    assert lines[0].startswith(f"{orphan}: label without image")
    assert lines[1].startswith(f"{label}: shape (32, 32, 15) differs from its image")
    assert lines[2] == "site-B: 3 cases, 2 problems"


def test_data_check_on_an_empty_folder_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "site-X").mkdir()

    code = main(["data", "check", str(tmp_path / "site-X")])

    lines = capsys.readouterr().out.splitlines()
    assert code == 4
    assert lines[0].startswith(f"{tmp_path / 'site-X'}: empty folder")
    assert lines[1] == "site-X: 0 cases, 1 problem"


def test_data_without_action_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["data"])

    assert info.value.code == 2
    assert "ACTION" in capsys.readouterr().err


@pytest.mark.slow  # two interpreter starts that import torch
def test_console_scripts_generate_and_check_demo_data(tmp_path: Path) -> None:
    fedmed = BIN / "fedmed"
    out = tmp_path / "demo" / "data"

    made = subprocess.run(
        [str(fedmed), "demo-data", str(out), "--sites", "3", "--cases", "2", "--seed", "0",
         "--shape", "16", "16", "8"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    checked = subprocess.run(
        [str(fedmed), "data", "check", *(str(out / f"site-{s}") for s in "ABC")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    assert made.returncode == 0, made.stderr
    assert "site-C: case 2/2" in made.stderr
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.splitlines() == [f"site-{s}: 2 cases, 0 problems" for s in "ABC"]


def test_data_check_escapes_control_characters_in_file_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a label whose name clears the screen and forges a second report line
    site = tmp_path / "site-X"
    zeros = np.zeros((4, 4, 4), np.uint8)
    write_nifti(site / "a_img.nii.gz", zeros, np.eye(4))
    write_nifti(site / "a\x1b[2J\nsite-X: 0 problems_seg.nii.gz", zeros, np.eye(4))

    # Execute
    code = main(["data", "check", "--no-progress", str(site)])

    # Assert: every line printable, the forged line is not a line of its own
    out = capsys.readouterr().out
    assert code == 4
    assert "\x1b" not in out
    assert out.splitlines()[-1] == "site-X: 2 cases, 2 problems"
    assert "a\\x1b[2J\\nsite-X: 0 problems_seg.nii.gz: label without image" in out


def test_data_check_reports_multi_channel_images_and_honours_the_limits(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = Path(shutil.copytree(demo_root / "site-A", tmp_path / "site-A"))
    image = site / "imagesTr" / "site-A_patient_000.nii.gz"
    write_nifti(image, np.zeros((32, 32, 16, 2), np.float32), np.eye(4))

    code = main(["data", "check", "--no-progress", "--affine-tol", "1000", str(site)])
    lines = capsys.readouterr().out.splitlines()
    tight = main(["data", "check", "--no-progress", "--max-image-gib", "1e-6", str(site)])

    assert code == tight == 4
    assert lines == [
        f"{image}: 2 channels (shape (32, 32, 16, 2)); fedmed's models read one-channel scans: "
        "export a 3D volume per scan",
        "site-A: 3 cases, 1 problem",
    ]
    assert capsys.readouterr().out.count("above the per-image limit") == 6
