"""bench/lamp_input.py: the whole-volume input is the largest training volume, rounded up to
what the U-Net's levels halve."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from fedmed.data.demo import generate_demo_federation

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))  # lamp_input imports quality_table as its script run does
spec = importlib.util.spec_from_file_location("lamp_input", BENCH / "lamp_input.py")
assert spec is not None and spec.loader is not None
lamp_input = importlib.util.module_from_spec(spec)
sys.modules["lamp_input"] = lamp_input
spec.loader.exec_module(lamp_input)


def test_the_whole_volume_input_covers_the_largest_volume(tmp_path):
    small = generate_demo_federation(
        tmp_path / "a", sites=1, cases=2, shape=(20, 24, 10), holdout=0
    )
    large = generate_demo_federation(tmp_path / "b", sites=1, cases=2, shape=(17, 8, 9), holdout=0)

    assert lamp_input.whole_volume_patch(small + large) == (24, 24, 16)
    assert lamp_input.whole_volume_patch(small, multiple=4) == (20, 24, 12)
