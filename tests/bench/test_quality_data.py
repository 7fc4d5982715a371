"""bench/quality_data.py: each site's validation patients stay the same whatever the run seed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from fedmed.io.msd import load_site_dataset, split_cases

BENCH = Path(__file__).resolve().parents[2] / "bench"
spec = importlib.util.spec_from_file_location("quality_data", BENCH / "quality_data.py")
assert spec is not None and spec.loader is not None
qd = importlib.util.module_from_spec(spec)
sys.modules["quality_data"] = qd
spec.loader.exec_module(qd)


def _validation_files(site: Path, seed: int) -> list[str]:
    _, val = split_cases(load_site_dataset(site).cases, val_fraction=0.3, seed=seed)
    return sorted(Path(c["image"]).name for c in val)


def test_the_split_is_the_same_for_every_training_seed(demo_root, tmp_path):
    folders = [demo_root / "site-A", demo_root / "site-B"]
    # fedmed's own split moves patients between sides as the seed changes ...
    plain = {s: _validation_files(demo_root / "site-A", s) for s in range(6)}
    assert len({tuple(v) for v in plain.values()}) > 1
    # ... the pinned copies keep the protocol's: the same files, images and order unchanged
    chosen = {}
    for seed in (0, 1, 5):
        sites = qd.pinned_sites(
            folders, tmp_path / f"s{seed}", seed=seed, val_fraction=0.3, data_seed=0
        )
        for site in sites:
            chosen.setdefault(site.name, set()).add(tuple(_validation_files(site, seed)))
            original = load_site_dataset(demo_root / site.name).cases
            pinned = load_site_dataset(site).cases
            assert [Path(c["image"]).name for c in pinned] == [
                Path(c["image"]).name for c in original
            ]
            assert Path(pinned[0]["image"]).read_bytes() == Path(original[0]["image"]).read_bytes()
    assert all(len(v) == 1 for v in chosen.values())
    assert all(len(next(iter(v))) == 1 for v in chosen.values())  # round(0.3 * 3) = 1 patient


def test_validation_patients_take_a_fixed_share():
    patients = [f"patient_{i:03d}" for i in range(16)]
    chosen = qd.validation_patients(patients, 0.3, "0:site-A")
    assert len(chosen) == 5 and chosen == qd.validation_patients(patients, 0.3, "0:site-A")
    assert chosen != qd.validation_patients(patients, 0.3, "0:site-B")
    assert len(qd.validation_patients(patients[:2], 0.9, "k")) == 1  # one always trains
